"""How BIF's wall time scales with the number of training examples n, query examples q and draws.

    python benchmarks/scaling.py                      # each axis with the other two at their base values
    python benchmarks/scaling.py --repeats 3 --json scaling.json

Model: the demo's MLP shape (8 -> 128 -> 128 -> 128 -> 1) on a random regression teacher. Base: n = 1024,
q = 128, 4 chains x 200 draws, default BIFArguments otherwise (checkpoints off). Each axis is varied alone and
fitted with time = a + b x (least squares): the cost model O(N_draws (n + q)) predicts a straight line in each
(with n and q sharing the per-example slope, and a constant for the curvature sketch and burn-in). Prints R^2 of
each fit and the medians over --repeats. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from common import describe_machine, quiet, write_json
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model

BASE = {"n": 1024, "q": 128, "draws": 200}
AXES = {"n": [256, 512, 1024, 2048, 4096], "q": [32, 128, 512, 2048], "draws": [50, 100, 200, 400, 800]}


def make(n: int, q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + q, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(n + q, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
    model.append(nn.GELU()).append(nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(0, n, (64,), generator=g)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def run(n: int, q: int, draws: int) -> float:
    model, train, query = make(n, q)
    task = RegressionTask()
    prepared = prepare_model(model, task)
    args = BIFArguments(sampler="rmsprop_sgld", num_draws=draws, checkpoint_interval=0)  # as BENCHMARKS measured
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("scaling", prepared, task, cpu=True, output_dir=tmp, disable_tqdm=True, strategy="bif")
        analyzer.fit_all_factors("bif", train, bif_args=args)
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "s", "bif", query, train, per_device_query_batch_size=512, per_device_train_batch_size=1024
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    quiet(opts.threads)
    machine = describe_machine(opts.threads)
    results: Dict[str, Any] = {}
    for axis, values in AXES.items():
        rows: List[Dict[str, float]] = []
        for value in values:
            point = {**BASE, axis: value}
            seconds = statistics.median(run(point["n"], point["q"], point["draws"]) for _ in range(opts.repeats))
            rows.append({**point, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
        x = np.array([r[axis] for r in rows], dtype=float)
        t = np.array([r["seconds"] for r in rows])
        slope, intercept = np.polyfit(x, t, 1)
        r2 = 1 - ((t - (intercept + slope * x)) ** 2).sum() / ((t - t.mean()) ** 2).sum()
        results[axis] = {"rows": rows, "intercept_s": intercept, "slope_s": slope, "r2": r2}
        print(f"{axis}: time = {intercept:.2f} s + {slope * 1e3:.3f} ms x {axis}   (R^2 {r2:.4f})", flush=True)
    print("\n| axis | values | fit | R^2 |\n|---|---|---|---:|")
    for axis, res in results.items():
        values = ", ".join(f"{r[axis]}: {r['seconds']:.1f} s" for r in res["rows"])
        fit = f"{res['intercept_s']:.2f} s + {res['slope_s'] * 1e3:.3f} ms x {axis}"
        print(f"| {axis} | {values} | {fit} | {res['r2']:.4f} |")
    write_json(opts.json, {"machine": machine, "axes": results})


if __name__ == "__main__":
    main()
