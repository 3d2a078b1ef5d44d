"""Chains as a batch dimension: K chains advanced in lockstep (`kronfluence_bif.batched`) vs one chain at a time.

    python benchmarks/batched_chains.py                   # K = 4, UCI MLP and tiny GPT-2, 1 thread, 3 repeats
    python benchmarks/batched_chains.py --chains 4 8 --draws 20 --json batched.json
    python benchmarks/batched_chains.py --smoke           # tiny sizes, seconds

Per draw of K chains: one plain-SGLD step per chain on its own minibatch, then the values of all n + q
evaluation examples under every chain's weights.
- loop: K model copies, each chain stepped by the package's `SGLD` and evaluated by a plain forward, one chain
  after the other (what the engine does today, minus its bookkeeping).
- batched: the K chains' sampled weights stacked [K, ...]; one `vmap`-ed `functional_call` forward (and one
  backward) for all chains, one `BatchedSGLD` update (`ChainBatch`, `batched_sgld_step`).
Both are timed in the same repeat, alternately; medians over repeats. The tiny GPT-2 runs with Hugging Face's
"sdpa" attention (the default; torch has no vmap batching rule for the CPU flash kernel, so vmap loops inside it)
and with "eager" attention (plain matmuls, fully batched). Prints a markdown table; not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, quiet, write_json  # noqa: E402
from plain_floor import FloorCase, sync, uci_case  # noqa: E402

from kronfluence_bif.batched import BatchedSGLD, ChainBatch, batched_sgld_step, replicate, stack_batches  # noqa: E402
from kronfluence_bif.sampler import SGLD  # noqa: E402

SGLD_ARGS = dict(step_size=1e-4, nbeta=100.0, localization=1e3)


def _minibatches(case: FloorCase, k: int, m: int, draws: int, seed: int = 0) -> List[List[Any]]:
    """Per draw, K minibatches (chain k's own rows), gathered before timing as the package's cached data is."""
    g = torch.Generator().manual_seed(seed)
    return [[case.gather_train(torch.randperm(case.n_train, generator=g)[:m]) for _ in range(k)] for _ in range(draws)]


def _eval_batches(case: FloorCase) -> List[Any]:
    return [case.gather_train(torch.arange(case.n_train)), case.gather_query(torch.arange(case.n_query))]


def loop_draws(case: FloorCase, k: int, m: int, draws: int, device: torch.device) -> Dict[str, float]:
    """Seconds per draw of K chains run one after the other (step, then evaluation), split into its two parts."""
    models = [copy.deepcopy(case.model) for _ in range(k)]
    batches, evals = _minibatches(case, k, m, draws), _eval_batches(case)
    parts = {"step": 0.0, "eval": 0.0}
    for c, model in enumerate(models):
        named = dict(model.named_parameters())
        params = [named[n].requires_grad_(True) for n in case.names]
        sampler = SGLD(params, [p.detach().clone() for p in params], generator=_gen(c, device), **SGLD_ARGS)
        for d in range(draws):
            parts["step"] -= _now(device)
            grads = torch.autograd.grad(case.values(batches[d][c], model).sum(), params)
            sampler.step(grads, m)
            parts["step"] += _now(device)
            parts["eval"] -= _now(device)
            with torch.inference_mode():
                for batch in evals:
                    case.values(batch, model)
            parts["eval"] += _now(device)
    return {key: value / draws for key, value in parts.items()}


def batched_draws(case: FloorCase, k: int, m: int, draws: int, device: torch.device) -> Dict[str, Any]:
    """Seconds per draw of K chains in lockstep through `kronfluence_bif.batched`, and the path it took."""
    model = copy.deepcopy(case.model)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    stacked = replicate(model, case.names, k)
    chains = ChainBatch(model, case.names, stacked)
    sampler = BatchedSGLD(stacked, anchors, generators=[_gen(c, device) for c in range(k)], **SGLD_ARGS)
    batches, evals = [stack_batches(b) for b in _minibatches(case, k, m, draws)], _eval_batches(case)
    parts = {"step": 0.0, "eval": 0.0}
    for d in range(draws):
        parts["step"] -= _now(device)
        batched_sgld_step(chains, sampler, lambda b, mod: case.values(b, mod).sum(), batches[d], m)
        parts["step"] += _now(device)
        parts["eval"] -= _now(device)
        with torch.inference_mode():
            for batch in evals:
                chains.evaluate(case.values, batch)
        parts["eval"] += _now(device)
    path = "loop (vmap failed)" if chains.mode == "loop" else "vmap"
    return {**{key: value / draws for key, value in parts.items()}, "mode": path}


def _gen(chain: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(chain)


def _now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def measure(case: FloorCase, k: int, m: int, draws: int, repeats: int, device: torch.device) -> Dict[str, Any]:
    """Loop and batched alternately, `repeats` times; medians of the per-draw seconds and the gain loop / batched."""
    loops, batched = [], []
    for _ in range(repeats):
        loops.append(loop_draws(case, k, m, draws, device))
        batched.append(batched_draws(case, k, m, draws, device))
    row: Dict[str, Any] = {"chains": k, "mode": batched[-1]["mode"]}
    for part in ("step", "eval"):
        row[f"loop_{part}_ms"] = 1e3 * statistics.median(r[part] for r in loops)
        row[f"batched_{part}_ms"] = 1e3 * statistics.median(r[part] for r in batched)
    row["loop_ms"] = 1e3 * statistics.median(r["step"] + r["eval"] for r in loops)
    row["batched_ms"] = 1e3 * statistics.median(r["step"] + r["eval"] for r in batched)
    row["gain"] = row["loop_ms"] / row["batched_ms"]
    return row


def cases(device: torch.device, smoke: bool, attention: List[str]) -> Dict[str, Callable[[], Dict]]:
    """Case name -> builder of (FloorCase, minibatch size)."""
    import lm_per_token as lm

    def gpt(impl: str) -> Dict:
        sizes = dict(n=8, q=2, length=16, train_steps=1) if smoke else dict(n=128, q=8, length=64, train_steps=50)
        case = lm.make_case(device=device, **sizes)
        case["model"].config._attn_implementation = impl
        case["floor"].values = case["task"].compute_per_token_train_loss
        return {"floor": case["floor"], "m": 4 if smoke else 16}

    out = {"UCI MLP 8-128-128-128-1, 927 + 103": lambda: {"floor": uci_case(device, smoke=smoke)["floor"], "m": 64}}
    for impl in attention:
        out[f"tiny GPT-2 2x128, per-token, 128 + 8 seqs of 64, attention {impl}"] = lambda impl=impl: gpt(impl)
    return out


def print_table(rows: List[Dict[str, Any]]) -> None:
    print("\n| case | K | path | loop ms/draw (step + eval) | batched ms/draw (step + eval) | gain |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['chains']} | {r['mode']} | {r['loop_ms']:.1f} ({r['loop_step_ms']:.1f} + "
            f"{r['loop_eval_ms']:.1f}) | {r['batched_ms']:.1f} ({r['batched_step_ms']:.1f} + "
            f"{r['batched_eval_ms']:.1f}) | {r['gain']:.2f}x |"
        )


def run(device: torch.device, chains: List[int], draws: int, repeats: int, smoke: bool, attention: List[str]):
    rows = []
    for name, build in cases(device, smoke, attention).items():
        built = build()
        for k in chains:
            row = {"case": name, **measure(built["floor"], k, built["m"], draws, repeats, device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[4])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"], choices=["sdpa", "eager"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    quiet(opts.threads, logging.WARNING)
    machine = describe_machine(opts.threads)
    draws, repeats = (2, 1) if opts.smoke else (opts.draws, opts.repeats)
    rows = run(torch.device("cpu"), opts.chains, draws, repeats, opts.smoke, opts.attention)
    print_table(rows)
    write_json(opts.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
