"""Issue 15's short- and long-run floor check on the demo UCI MLP: plain SGLD, 4 chains x 50 and x 400 draws.

    python benchmarks/floor_uci_sgld.py --repeats 3

`plain_floor.sgld_floor` (the unavoidable steps, evaluations and moment GEMMs as a tight torch loop) and the
package's `fit_all_factors` + `compute_pairwise_scores` (checkpoints every 100 draws, diagnostics on), interleaved,
1 thread; prints each repeat and the median BIF / floor ratio of the repeats' pairs. The pair's order alternates
(floor first, then BIF first), so a machine that slows down or speeds up during a run favours neither side; on a
machine where one repeat's ratio swings by 0.1-0.2 (BENCHMARKS.md), run more repeats than the target's 3.
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
    parser.add_argument("--draws", type=int, nargs="+", default=[50, 400], help="draws per chain, one row each")
    opts = parser.parse_args()
    set_threads(1)
    case = uci_case(torch.device("cpu"))
    floor = case["floor"]
    print("| draws per chain | floor (s) | BIF (s) | BIF / floor | median | load |\n|---:|---|---|---|---:|---:|")
    for draws in opts.draws:
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
        data = (case["model"], case["task"], case["train"], case["query"], args, floor.eval_batch, floor.query_batch)
        for repeat in range(opts.repeats):
            for side in ("floor", "bif") if repeat % 2 == 0 else ("bif", "floor"):
                if side == "floor":
                    floors.append(sgld_floor(floor, args, torch.device("cpu")))
                else:
                    runs.append(package_run(*data))
        ratios = [b / a for a, b in zip(floors, runs)]
        fmt = ", ".join
        print(
            f"| {draws} | {fmt(f'{t:.2f}' for t in floors)} | {fmt(f'{t:.2f}' for t in runs)} | "
            f"{fmt(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.3f} | {os.getloadavg()[0]:.1f} |"
        )


if __name__ == "__main__":
    main()
