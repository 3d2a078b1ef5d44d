"""`python -m kronfluence_bif.demo`: EK-FAC and BIF on the UCI concrete MLP with the same script.

Trains kronfluence's UCI regression MLP on the shipped data (no downloads), fits/scores EK-FAC and BIF through
one Analyzer, and prints their agreement, their wall times and the most influential training rows.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch

from kronfluence_bif import Analyzer, BIFArguments, FactorArguments, RegressionTask, prepare_model
from kronfluence_bif.compare import compare
from kronfluence_bif.demo.uci import load_concrete, train_mlp
from kronfluence_bif.threads import set_threads, user_thread_setting

COLUMNS = ["cement", "slag", "fly_ash", "water", "superplast", "coarse_agg", "fine_agg", "age"]


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> Dict[str, float]:
    """Mean per-query Spearman and top-k overlap of two [n_query, n_train] score matrices.

    A thin view of `kronfluence_bif.compare` (numpy only, so the demo runs without scipy); queries whose scores
    are constant have no ranking and are left out of both means.
    """
    comparison = compare(a, b, k=k)
    return {"spearman": comparison.mean_spearman, f"top{k}_overlap": comparison.mean_topk_overlap}


def run_uci_ab(
    output_dir: str, bif_args: Optional[BIFArguments] = None, epochs: int = 100, disable_tqdm: bool = True
) -> Dict[str, Any]:
    """Train the MLP, score with EK-FAC and BIF in one Analyzer, return scores, timings and agreement."""
    train, test = load_concrete()
    model = train_mlp(train, epochs=epochs)
    task = RegressionTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("uci", model, task, cpu=True, output_dir=output_dir, disable_tqdm=disable_tqdm)
    common = dict(
        query_dataset=test,
        train_dataset=train,
        per_device_query_batch_size=len(test),
        per_device_train_batch_size=len(train),
        overwrite_output_dir=True,
    )
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=len(train), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("ekfac", "ekfac", **common)
    ekfac_time = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "bif", dataset=train, factor_args=FactorArguments(strategy="bif"), bif_args=bif_args, overwrite_output_dir=True
    )
    analyzer.compute_pairwise_scores("bif", "bif", **common)
    bif_time = time.perf_counter() - start
    ekfac = analyzer.load_pairwise_scores("ekfac")["all_modules"].numpy()
    bif = analyzer.load_pairwise_scores("bif")["all_modules"].numpy()
    return {
        "ekfac": ekfac,
        "bif": bif,
        "ekfac_seconds": ekfac_time,
        "bif_seconds": bif_time,
        "agreement": agreement(ekfac, bif),
        "train": train,
        "test": test,
    }


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kronfluence_bif.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="./influence_results", help="where the score folders go")
    parser.add_argument("--queries", type=int, default=2, help="queries whose top training rows are printed")
    parser.add_argument("--top", type=int, default=3, help="training rows printed per query and method")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of the MLP")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for this small MLP, whose kernels gain nothing from more and slow down when "
        "the cores are shared; OMP_NUM_THREADS is kept)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp deprecation notices
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    threads = args.threads or (torch.get_num_threads() if user_thread_setting() else 1)
    print(f"Training the UCI concrete MLP (8-128-128-128-1) on the shipped data ({threads} thread(s)) ...")
    set_threads(threads)
    r = run_uci_ab(args.output_dir, epochs=args.epochs, disable_tqdm=args.quiet)
    ek, bif = r["ekfac"], r["bif"]
    print(f"\nScores: {ek.shape[0]} queries x {ek.shape[1]} training rows, in {args.output_dir}/uci/scores_*/")
    print(f"EK-FAC (fit + score): {r['ekfac_seconds']:.1f} s    BIF (one SGLD phase): {r['bif_seconds']:.1f} s")
    a = r["agreement"]
    print(
        f"Agreement BIF vs EK-FAC: mean per-query Spearman {a['spearman']:.3f}, top-10 overlap {a['top10_overlap']:.2f}"
        f" (random scores: 0.000 and {10 / ek.shape[1]:.3f})"
    )
    x_train = r["train"].tensors[0].numpy()
    for q in range(min(args.queries, ek.shape[0])):
        print(f"\nQuery {q}: most helpful training rows (positive = lowers the query's loss)")
        for name, s in (("EK-FAC", ek), ("BIF", bif)):
            top = np.argsort(-s[q])[: args.top]
            rows = ", ".join(f"#{i} ({s[q, i]:+.3g})" for i in top)
            print(f"  {name:6s} {rows}")
        best = int(np.argsort(-bif[q])[0])
        feats = " ".join(f"{c}={v:+.2f}" for c, v in zip(COLUMNS, x_train[best]))
        print(f"  BIF's top row #{best} (standardized): {feats}")


if __name__ == "__main__":
    main()
