"""What the per-draw diagnostics cost: the same BIF run with `step_diagnostics` on and off, interleaved.

    python benchmarks/diagnostics_cost.py --repeats 5
    python benchmarks/diagnostics_cost.py --repeats 3 --chains 4 --draws 50     # a short run

The per-draw diagnostics are the step norms (gradient, localization and noise moves of the step before a draw)
and the distance from w*; the loss traces (R-hat, ESS, divergence) come from the evaluation itself and are not
switched off. The case is the demo's UCI MLP (927 train x 103 query, 1 thread), the smallest shipped model, where a
fixed per-draw cost weighs the most. Not a test: prints a table (medians, and each repeat's on / off ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics

import torch
from plain_floor import package_run, uci_case

from kronfluence_bif import BIFArguments
from kronfluence_bif.threads import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--sampler", default="rmsprop_sgld")
    opts = parser.parse_args()
    set_threads(1)
    case = uci_case(torch.device("cpu"))
    base = BIFArguments(sampler=opts.sampler, num_chains=opts.chains, num_draws=opts.draws, checkpoint_interval=0)
    runs = {"on": base, "off": dataclasses.replace(base, step_diagnostics=False)}
    times = {k: [] for k in runs}
    for _ in range(opts.repeats):
        for name, args in runs.items():  # interleaved: both see the same machine load
            n, q = len(case["train"]), len(case["query"])
            times[name].append(package_run(case["model"], case["task"], case["train"], case["query"], args, n, q))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    print(
        f"UCI MLP, {opts.sampler}, {opts.chains} chains x {opts.draws} draws, {opts.repeats} repeats, load "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print("| step_diagnostics | median (s) | min - max |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} - {max(values):.2f} |")
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    print(
        f"\ncost of the diagnostics: median {100 * (statistics.median(ratios) - 1):+.1f}% "
        f"(per repeat: {', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
