"""Issue 14's stability target on the wide model: `BIFArguments()` (the defaults) on floor.py's 3x1024 MLP.

    python benchmarks/wide_defaults.py --draws 100 --chains 4

The 3x1024 tanh MLP (2.1M weights, 2048 train x 128 query rows, trained 200 Adam steps) through the Analyzer with
the defaults but for the chain and draw counts; prints the sampler "auto" resolved to, whether any chain diverged,
the mean train loss at w* and over the draws, the largest distance from w*, R-hat and the ESS fraction per chain
(from `bif_diagnostics.json`), and the wall time. One thread per process unless `--threads`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import quiet
from error_budget import chain_health
from floor import make_case

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    quiet(opts.threads)
    train, query, model = make_case("mlp1024")
    task = RegressionTask()
    model = prepare_model(model, task)
    args = BIFArguments(num_chains=opts.chains, num_draws=opts.draws)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("wide", model, task, cpu=True, output_dir=tmp, disable_tqdm=True, strategy="bif")
        start = time.perf_counter()
        analyzer.fit_all_factors("bif", train, bif_args=args)
        error = ""
        try:
            analyzer.compute_pairwise_scores(
                "s", "bif", query, train, per_device_query_batch_size=128, per_device_train_batch_size=512
            )
        except Exception as exc:  # noqa: BLE001 - a divergence is the result being measured
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        seconds = time.perf_counter() - start
        folder = Path(tmp) / "wide" / "scores_s"
        row = {"draws": f"{opts.chains} x {opts.draws}", "seconds": round(seconds, 1), "error": error}
        if not error:
            diag = json.loads((folder / "bif_diagnostics.json").read_text())
            chains = diag["chains"]
            row |= {
                "sampler": diag["sampler_arguments"]["sampler"],
                "loss_at_w_star": chains[0]["initial_mean_loss"],
                "mean_loss_over_draws": sum(c["mean_loss"] for c in chains) / len(chains),
                "max_distance_from_w_star": max(c["max_distance_from_w_star"] for c in chains),
                **chain_health(folder, opts.draws),
                "warnings": sorted({w["code"] for w in diag["warnings"]}),
            }
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
