"""BIF's overhead over its compute floor: the same draws in a tight plain-torch loop vs the package's run.

    python benchmarks/floor.py                      # UCI demo MLP and a 3x1024 MLP (n=2048, q=128), 3 repeats
    python benchmarks/floor.py --cases uci --repeats 5 --threads 2 --json floor.json
    python benchmarks/floor.py --cases mlp1024 --chains 4 --draws 50 --repeats 3    # issue 15's short run

The floor does only what BIF cannot avoid, with the same arguments: the sampler's steps on minibatches of m
examples (RMSprop-SGLD, the default, with its frozen diagonal preconditioner; or, with `--sampler sketch_sgld`, the
package's `sketch_fisher` once and its `SketchSGLD` step: that step is the algorithm, so the ratio measures the
engine around it), and at every draw the per-example losses of the train and query examples under inference
mode with the same evaluation batch sizes, plus one float64 GEMM per block of draws into the cross-moment sums.
The package run is `compute_pairwise_scores` through the
Analyzer (checkpoints off, and with the default checkpoint interval). Prints medians over repeats and the
ratio package / floor, floor and package interleaved in each repeat. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from common import describe_machine, quiet, write_json
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.curvature import CurvatureSketch, sketch_fisher
from kronfluence_bif.sampler import SketchSGLD


def make_case(name: str):
    if name == "uci":
        from kronfluence_bif.demo.uci import load_concrete, train_mlp

        train, query = load_concrete()
        return train, query, train_mlp(train, epochs=100)
    width, n, q, d = 1024, 2048, 128, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + q, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, 1, generator=g)) + 0.1 * torch.randn(n + q, 1, generator=g)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    model.append(nn.Linear(width, width)).append(nn.Tanh()).append(nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        idx = torch.randint(0, n, (128,), generator=g)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), model.eval()


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).sum(1)


def floor_run(model: nn.Module, train, query, args: BIFArguments, eval_bs: int, query_bs: int) -> float:
    """The unavoidable work of one BIF sampling phase, as plainly as torch allows."""
    params = [p.requires_grad_(True) for p in model.parameters()]
    anchors = [p.detach().clone() for p in params]
    xt, yt = train.tensors
    xq, yq = query.tensors
    n, q, m = len(xt), len(xq), args.sampler_batch_size
    sum_xy = torch.zeros(q, n, dtype=torch.float64)
    sum_x, sum_y = torch.zeros(n, dtype=torch.float64), torch.zeros(q, dtype=torch.float64)
    buf_x, buf_y = torch.empty(args.draws_per_block, n), torch.empty(args.draws_per_block, q)
    start = time.perf_counter()
    sketch = _floor_sketch(model, params, xt, args) if args.sampler == "sketch_sgld" else None
    for chain in range(args.num_chains):
        gen = torch.Generator().manual_seed(chain)
        with torch.no_grad():
            torch._foreach_copy_(params, anchors)
        square = [torch.zeros_like(p) for p in params]
        precond = None
        stepper = (
            None
            if sketch is None
            else SketchSGLD(params, anchors, args.step_size, args.nbeta, args.localization, gen, sketch)
        )
        perm, pos = torch.randperm(n, generator=gen), 0
        filled = 0
        for step in range(args.num_burnin_steps + args.num_draws):
            if pos + m > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + m]
            pos += m
            loss = per_example(model, xt[idx], yt[idx]).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if stepper is not None:
                    stepper.step(grads, m)
                else:
                    precond = _rmsprop_step(params, anchors, grads, square, precond, step, args, gen)
            if step < args.num_burnin_steps:
                continue
            with torch.inference_mode():
                for s in range(0, n, eval_bs):
                    buf_x[filled, s : s + eval_bs] = per_example(model, xt[s : s + eval_bs], yt[s : s + eval_bs])
                for s in range(0, q, query_bs):
                    buf_y[filled, s : s + query_bs] = per_example(model, xq[s : s + query_bs], yq[s : s + query_bs])
            filled += 1
            if filled == args.draws_per_block or step == args.num_burnin_steps + args.num_draws - 1:
                bx, by = buf_x[:filled].double(), buf_y[:filled].double()
                sum_x += bx.sum(0)
                sum_y += by.sum(0)
                sum_xy.addmm_(by.T, bx)
                filled = 0
    with torch.no_grad():
        torch._foreach_copy_(params, anchors)
    return time.perf_counter() - start


def _rmsprop_step(params, anchors, grads, square, precond, step, args: BIFArguments, gen):
    """One RMSprop-SGLD step; the preconditioner is frozen after burn-in (returned once frozen)."""
    drift = torch._foreach_mul(grads, args.nbeta / args.sampler_batch_size)
    if precond is None:
        torch._foreach_mul_(square, args.rmsprop_alpha)
        torch._foreach_addcmul_(square, drift, drift, value=1 - args.rmsprop_alpha)
        g = torch._foreach_reciprocal(torch._foreach_add(torch._foreach_sqrt(square), args.rmsprop_eps))
        if step == args.num_burnin_steps - 1:
            precond = g
    else:
        g = precond
    torch._foreach_add_(drift, torch._foreach_sub(params, anchors), alpha=args.localization)
    torch._foreach_mul_(drift, g)
    torch._foreach_add_(params, drift, alpha=-0.5 * args.step_size)
    noise = [torch.randn(p.shape, generator=gen) for p in params]
    torch._foreach_mul_(noise, torch._foreach_sqrt(g))
    torch._foreach_add_(params, noise, alpha=math.sqrt(args.step_size))
    return precond


def _floor_sketch(model, params, xt, args: BIFArguments) -> CurvatureSketch:
    """The package's sketch from K sampled-label gradients at w* (regression: targets = output + N(0, 1))."""
    n, m = len(xt), min(args.sampler_batch_size, len(xt))
    gen = torch.Generator().manual_seed(123)
    batches = [torch.randperm(n, generator=gen)[:m] for _ in range(args.sketch_rank)]

    def sampled_loss(idx):
        out = model(xt[idx])
        return (out - (out.detach() + torch.randn(out.shape, generator=gen))).pow(2).sum()

    return sketch_fisher(sampled_loss, batches, params, m)


def package_run(model, train, query, args: BIFArguments, eval_bs: int, query_bs: int) -> float:
    task = RegressionTask()
    prepared = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("floor", prepared, task, cpu=True, output_dir=tmp, disable_tqdm=True, strategy="bif")
        analyzer.fit_all_factors("bif", train, bif_args=args)
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "bif", "bif", query, train, per_device_query_batch_size=query_bs, per_device_train_batch_size=eval_bs
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["uci", "mlp1024"], choices=["uci", "mlp1024"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="")
    parser.add_argument("--sampler", default="rmsprop_sgld", choices=["rmsprop_sgld", "sketch_sgld"])
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200, help="per chain (issue 15's short run: 4 x 50)")
    opts = parser.parse_args()
    quiet(opts.threads, logging.WARNING, FutureWarning)
    machine = describe_machine(opts.threads)
    rows: List[Dict] = []
    for case in opts.cases:
        train, query, model = make_case(case)
        eval_bs, query_bs = 512, 128
        for label, interval in (("no checkpoints", 0), ("checkpoints every 100 draws", 100)):
            args = BIFArguments(
                sampler=opts.sampler, num_chains=opts.chains, num_draws=opts.draws, checkpoint_interval=interval
            )
            floors, runs = [], []
            for _ in range(opts.repeats):  # interleaved: a load change hits both
                floors.append(floor_run(model, train, query, args, eval_bs, query_bs))
                runs.append(package_run(model, train, query, args, eval_bs, query_bs))
            row = {
                "case": case,
                "setting": label,
                "n_train": len(train),
                "n_query": len(query),
                "floor_s": statistics.median(floors),
                "bif_s": statistics.median(runs),
            }
            row["ratio"] = row["bif_s"] / row["floor_s"]
            rows.append(row)
            print(json.dumps(row))
    print("\n| case | setting | n x q | floor (s) | BIF (s) | ratio |\n|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['setting']} | {r['n_train']} x {r['n_query']} | {r['floor_s']:.2f} | "
            f"{r['bif_s']:.2f} | {r['ratio']:.2f} |"
        )
    write_json(opts.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
