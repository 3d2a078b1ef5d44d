"""Issue 15's short- and long-run floor check on the demo UCI MLP: plain SGLD, 4 chains x 50 and x 400 draws.

    python benchmarks/floor_uci_sgld.py --repeats 3

`plain_floor.sgld_floor` (the unavoidable steps, evaluations and moment GEMMs as a tight torch loop) and the
package's `fit_all_factors` + `compute_pairwise_scores` (checkpoints every 100 draws, diagnostics on), interleaved,
1 thread; prints each repeat and the median BIF / floor ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from plain_floor import package_run, sgld_floor, uci_case

from kronfluence_bif import BIFArguments
from kronfluence_bif.threads import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    set_threads(1)
    case = uci_case(torch.device("cpu"))
    floor = case["floor"]
    print("| draws per chain | floor (s) | BIF (s) | BIF / floor (median) | load |\n|---:|---|---|---:|---:|")
    for draws in (50, 400):
        args = BIFArguments(
            sampler="sgld",
            step_size=1e-4,
            nbeta=100.0,
            localization=1e3,
            num_chains=4,
            num_draws=draws,
            num_burnin_steps=100,
            checkpoint_interval=100,
        )
        floors, runs = [], []
        for _ in range(opts.repeats):
            floors.append(sgld_floor(floor, args, torch.device("cpu")))
            data = (case["train"], case["query"])
            runs.append(package_run(case["model"], case["task"], *data, args, floor.eval_batch, floor.query_batch))
        ratio = statistics.median(b / a for a, b in zip(floors, runs))
        fmt = ", ".join
        print(
            f"| {draws} | {fmt(f'{t:.2f}' for t in floors)} | {fmt(f'{t:.2f}' for t in runs)} | {ratio:.3f} | "
            f"{os.getloadavg()[0]:.1f} |"
        )


if __name__ == "__main__":
    main()
