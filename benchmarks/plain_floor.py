"""The plain-SGLD compute floor of a BIF run on any device, and the package's run to compare with it.

BIF cannot avoid, per chain: `num_burnin_steps + num_draws` minibatch gradient steps and, at every kept draw, the
per-example (or per-token) values of the n training and q query examples, folded into float64 cross-moment sums
by one GEMM per block of draws. `sgld_floor` does exactly that as a tight torch loop (cached data on the device,
one flat noise buffer per chain, `_foreach` updates, no diagnostics, no files), like `benchmarks/floor.py` does
for RMSprop-SGLD on the CPU. `package_run` times `fit_all_factors` + `compute_pairwise_scores` through the
package's Analyzer with the same arguments. Both return seconds; on CUDA they synchronize before reading the
clock. Imported by `lm_per_token.py`, `gpu.py` and `batched_chains.py`; not a script.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from kronfluence_bif import Analyzer, BIFArguments, ScoreArguments, prepare_model

Values = Callable[[Any, nn.Module], torch.Tensor]  # (batch, model) -> [B] or [B, T]
Gather = Callable[[torch.Tensor], Any]  # row indices -> a batch on the device


@dataclass
class FloorCase:
    """What the floor needs: the model, the sampled parameter names, data access and the per-example view."""

    model: nn.Module
    names: list
    gather_train: Gather
    gather_query: Gather
    n_train: int
    n_query: int
    values: Values  # per-example (or per-token) values, the evaluation view
    eval_batch: int
    query_batch: int


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so the clock measures work done (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eval_batches(case: FloorCase) -> list:
    """The evaluation batches of the train then the query set, gathered once (the package caches them too)."""
    out = []
    for gather, n, bs in (
        (case.gather_train, case.n_train, case.eval_batch),
        (case.gather_query, case.n_query, case.query_batch),
    ):
        out += [gather(torch.arange(s, min(s + bs, n))) for s in range(0, n, bs)]
    return out


def _evaluate(case: FloorCase, batches: list, row: torch.Tensor) -> None:
    """Per-example values of the cached evaluation batches into `row` (flattened, train first)."""
    offset = 0
    for batch in batches:
        values = case.values(batch, case.model).reshape(-1)
        row[offset : offset + values.numel()] = values
        offset += values.numel()


def _width(case: FloorCase) -> tuple:
    """Columns of the train and query sides: examples x values per example (T for per-token views)."""
    with torch.inference_mode():
        tx = case.values(case.gather_train(torch.arange(1)), case.model).numel()
        ty = case.values(case.gather_query(torch.arange(1)), case.model).numel()
    return case.n_train * tx, case.n_query * ty


def sgld_floor(case: FloorCase, args: BIFArguments, device: torch.device) -> float:
    """Seconds of the unavoidable work of a plain-SGLD BIF run (`args.sampler` must be "sgld")."""
    if args.sampler != "sgld":
        raise ValueError("sgld_floor times plain SGLD; use benchmarks/floor.py for RMSprop-SGLD and sketch-SGLD.")
    named = dict(case.model.named_parameters())
    params = [named[n].requires_grad_(True) for n in case.names]
    anchors = [p.detach().clone() for p in params]
    dim_x, dim_y = _width(case)
    batches = _eval_batches(case)
    f64 = dict(dtype=torch.float64, device=device)
    sum_xy, sum_x, sum_y = torch.zeros(dim_y, dim_x, **f64), torch.zeros(dim_x, **f64), torch.zeros(dim_y, **f64)
    buf = torch.empty(args.draws_per_block, dim_x + dim_y, device=device)
    m, steps = args.sampler_batch_size, args.num_burnin_steps + args.num_draws
    numel = sum(p.numel() for p in params)
    flat = torch.empty(numel, device=device)
    noise = list(torch.split(flat, [p.numel() for p in params]))
    noise = [t.view(p.shape) for t, p in zip(noise, params)]
    sync(device)
    start = time.perf_counter()
    for chain in range(args.num_chains):
        gen = torch.Generator(device=device).manual_seed(chain)
        shuffle = torch.Generator().manual_seed(chain)
        with torch.no_grad():
            torch._foreach_copy_(params, anchors)
        perm, pos, filled = torch.randperm(case.n_train, generator=shuffle), 0, 0
        for step in range(steps):
            if pos + m > case.n_train:
                perm, pos = torch.randperm(case.n_train, generator=shuffle), 0
            loss = case.values(case.gather_train(perm[pos : pos + m]), case.model).sum()
            pos += m
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                drift = torch._foreach_mul(grads, args.nbeta / m)
                torch._foreach_add_(drift, torch._foreach_sub(params, anchors), alpha=args.localization)
                torch._foreach_add_(params, drift, alpha=-0.5 * args.step_size)
                flat.normal_(generator=gen)
                torch._foreach_add_(params, noise, alpha=math.sqrt(args.step_size))
            if step < args.num_burnin_steps:
                continue
            with torch.inference_mode():
                _evaluate(case, batches, buf[filled])
            filled += 1
            if filled == args.draws_per_block or step == steps - 1:
                block = buf[:filled].double()
                sum_x += block[:, :dim_x].sum(0)
                sum_y += block[:, dim_x:].sum(0)
                sum_xy.addmm_(block[:, dim_x:].T, block[:, :dim_x])
                filled = 0
    sync(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        torch._foreach_copy_(params, anchors)
    for p in params:
        p.requires_grad_(False)
    return seconds


def package_run(
    model: nn.Module,
    task: Any,
    train: Any,
    query: Any,
    args: BIFArguments,
    eval_batch: int,
    query_batch: int,
    per_token: bool = False,
    cpu: bool = True,
    output_dir: Optional[str] = None,
) -> float:
    """Seconds of `fit_all_factors` + `compute_pairwise_scores` with strategy "bif" (a fresh prepared copy)."""
    prepared = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        analyzer = Analyzer("floor", prepared, task, cpu=cpu, output_dir=tmp, disable_tqdm=True, strategy="bif")
        device = next(prepared.parameters()).device
        sync(device)
        start = time.perf_counter()
        analyzer.fit_all_factors("bif", train, bif_args=args)
        analyzer.compute_pairwise_scores(
            "bif",
            "bif",
            query,
            train,
            per_device_query_batch_size=query_batch,
            per_device_train_batch_size=eval_batch,
            score_args=ScoreArguments(compute_per_token_scores=per_token),
        )
        sync(device)
        return time.perf_counter() - start


def regression_values(batch: Any, model: nn.Module) -> torch.Tensor:
    """Squared error of each example, [B] (the package's `RegressionTask`)."""
    x, y = batch
    return (model(x) - y).pow(2).sum(1)


def uci_case(device: torch.device, epochs: int = 100, smoke: bool = False) -> Dict[str, Any]:
    """The demo's UCI concrete MLP (8-128-128-128-1, 927 x 103) trained as the demo does, with its floor view.

    With `smoke`, a random 64 x 16 regression and an untrained MLP of the same shape (seconds, for tests)."""
    from torch.utils.data import TensorDataset

    from kronfluence_bif import RegressionTask
    from kronfluence_bif.demo.uci import load_concrete, make_mlp, train_mlp

    if smoke:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(80, 8, generator=g), torch.randn(80, 1, generator=g)
        train, query, model = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), make_mlp().eval()
    else:
        train, query = load_concrete()
        model = train_mlp(train, epochs=epochs).eval()
    model = model.to(device)
    tensors = {"t": [t.to(device) for t in train.tensors], "q": [t.to(device) for t in query.tensors]}

    def gather(side: str) -> Gather:
        return lambda idx: tuple(t[idx.to(device)] for t in tensors[side])

    names = [n for n, _ in model.named_parameters()]
    n, q = len(train), len(query)
    floor = FloorCase(model, names, gather("t"), gather("q"), n, q, regression_values, eval_batch=n, query_batch=q)
    return dict(model=model, task=RegressionTask(), train=train, query=query, floor=floor)
