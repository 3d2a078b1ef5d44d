"""GPU check of issue 15 in one short run (< 5 minutes on one H200): floor ratios, batched chains, tokens/s vs peak.

    python benchmarks/gpu.py                      # on a CUDA machine; prints markdown tables, --json for the rows
    python benchmarks/gpu.py --peak-tflops 312    # another GPU's dense bf16 peak (default: H100/H200 989)
    python benchmarks/gpu.py --smoke              # CPU, tiny sizes, seconds (tests/test_gpu_script.py runs it)

1. Floor ratio (package / plain-torch floor, `plain_floor.py`), plain SGLD, 4 chains x 50 draws, median of 3 with
   floor and package interleaved: the UCI concrete MLP (sequence scores; step 3e-4, nbeta 1e3, gamma 1e3, m 64,
   100 burn-in steps) and the tiny GPT-2 per-token case of `lm_per_token.py` (its issue settings).
2. Batched chains (`batched_chains.py`): K = 4 and 16 chains in lockstep through `kronfluence_bif.batched`
   (one vmap-ed forward/backward for all chains) against one chain at a time, per draw.
3. Evaluation throughput: per-token loss forwards under bf16 autocast, tokens/s and the fraction of the GPU's dense
   bf16 peak, with forward FLOPs per token ~ 2 x (weights in matrix products); for the tiny GPT-2 at BIF's
   evaluation batch (128 x 64 tokens), at a large batch, with K = 4 chains batched, and for a 12 x 768 GPT-2
   (GPT-2 small's body, vocabulary 256) at a large batch, which shows the ceiling for a model that is not tiny.
Each section runs on its own: an error is printed and the others still run. Says at the top whether CUDA ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batched_chains  # noqa: E402
import lm_per_token as lm  # noqa: E402
from common import describe_machine, quiet, write_json  # noqa: E402
from plain_floor import package_run, sgld_floor, sync, uci_case  # noqa: E402

from kronfluence_bif import BIFArguments  # noqa: E402
from kronfluence_bif.batched import ChainBatch, replicate  # noqa: E402

UCI_ARGS = dict(sampler="sgld", num_chains=4, num_draws=50)  # package defaults otherwise (step 3e-4, m 64, ...)


def floor_ratios(device: torch.device, smoke: bool, repeats: int) -> List[Dict[str, Any]]:
    """Package / floor for the UCI MLP and the tiny GPT-2 per-token case, interleaved, medians."""
    small = dict(num_chains=2, num_draws=3, sampler_batch_size=4, num_burnin_steps=1) if smoke else {}
    sizes = dict(n=8, q=2, length=16, train_steps=1) if smoke else dict(n=128, q=8, length=64, train_steps=300)
    cases = [
        ("UCI MLP, sequence scores", lambda: uci_case(device, smoke=smoke), {**UCI_ARGS, **small}, False),
        ("tiny GPT-2, per-token", lambda: lm.make_case(device=device, **sizes), {**lm.ISSUE_ARGS, **small}, True),
    ]  # fmt: skip
    rows = []
    for name, build, bif, per_token in cases:
        case, args = build(), BIFArguments(**bif)
        n, q = len(case["train"]), len(case["query"])
        floors, runs = [], []
        for _ in range(repeats):
            floors.append(sgld_floor(case["floor"], args, device))
            cpu = device.type == "cpu"
            runs.append(
                package_run(case["model"], case["task"], case["train"], case["query"], args, n, q, per_token, cpu)
            )
        row = {"case": name, "floor_s": statistics.median(floors), "bif_s": statistics.median(runs)}
        row["ratio"] = row["bif_s"] / row["floor_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| case | floor (s) | BIF (s) | BIF / floor |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['floor_s']:.2f} | {r['bif_s']:.2f} | {r['ratio']:.2f} |")
    return rows


def batched_gain(device: torch.device, smoke: bool, repeats: int) -> List[Dict[str, Any]]:
    chains, draws = ([2], 2) if smoke else ([4, 16], 10)
    rows = batched_chains.run(device, chains, draws, repeats, smoke, ["eager"] if smoke else ["sdpa", "eager"])
    batched_chains.print_table(rows)
    return rows


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matrix product per token (linear layers; embeddings are lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _timed(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Calls per second of `fn` over about `seconds` (after two warm-up calls)."""
    fn(), fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync(device)
    return calls / (time.perf_counter() - start)


def forward_rate(model: nn.Module, batch: int, length: int, k: int, device: torch.device, seconds: float) -> float:
    """Per-token loss forwards per second under bf16 autocast; K > 1: K chains' linear weights batched by vmap."""
    ids = torch.randint(0, 256, (batch, length), device=device)
    data = {"input_ids": ids, "labels": ids}
    names = [f"{m}.weight" for m in lm.linear_names(model)]
    chains = ChainBatch(model, names, replicate(model, names, k)) if k > 1 else None

    def forward() -> Any:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return lm.per_token_loss(data, model) if chains is None else chains.evaluate(lm.per_token_loss, data)

    return _timed(forward, device, seconds)


def throughput(device: torch.device, smoke: bool, peak_tflops: float) -> List[Dict[str, Any]]:
    """Evaluation tokens/s of per-token loss forwards under bf16 autocast, and the fraction of the bf16 peak."""
    length = 16 if smoke else 64
    big = 8 if smoke else 4096
    tiny = lm.make_model(length, 32 if smoke else 128).to(device).eval()
    body = lm.make_model(length, 32 if smoke else 768, layers=2 if smoke else 12, heads=4 if smoke else 12)
    body = body.to(device).eval()
    settings = [("tiny GPT-2, BIF's evaluation batch", tiny, 8 if smoke else 128, 1)]
    settings += [("tiny GPT-2, large batch", tiny, big, 1), ("tiny GPT-2, K = 4 chains batched", tiny, big // 4, 4)]
    settings += [("12 x 768 GPT-2, large batch", body, 8 if smoke else 512, 1)]
    rows = []
    for name, model, batch, k in settings:
        calls = forward_rate(model, batch, length, k, device, 0.2 if smoke else 5.0)
        tokens = calls * batch * length * k
        flops = tokens * 2 * matmul_weights(model)
        row = {"setting": name, "tokens_per_call": batch * length * k, "tokens_per_s": tokens, "tflops": flops / 1e12}
        row["fraction_of_peak"] = row["tflops"] / peak_tflops
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| setting | tokens per call | tokens/s | TFLOP/s (2 x weights / token) | of {peak_tflops:g} peak |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['tokens_per_call']:,} | {r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | "
            f"{100 * r['fraction_of_peak']:.2f}% |"
        )
    return rows


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="")
    opts = parser.parse_args(argv)
    quiet(opts.threads, logging.WARNING)
    machine = describe_machine(opts.threads)
    cuda = torch.cuda.is_available() and not opts.smoke
    device = torch.device("cuda" if cuda else "cpu")
    machine["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"ran on: {machine['device']}" + ("" if cuda else " (no CUDA: the figures are not GPU figures)"), flush=True)
    repeats = 1 if opts.smoke else opts.repeats
    sections = {
        "floor_ratio": lambda: floor_ratios(device, opts.smoke, repeats),
        "batched_chains": lambda: batched_gain(device, opts.smoke, repeats),
        "throughput": lambda: throughput(device, opts.smoke, opts.peak_tflops),
    }
    results: Dict[str, Any] = {"machine": machine}
    for name, section in sections.items():
        start = time.perf_counter()
        print(f"\n## {name}", flush=True)
        try:
            results[name] = section()
        except Exception:  # noqa: BLE001 - report and go on: one failing section must not hide the others
            traceback.print_exc()
            results[name] = {"error": traceback.format_exc(limit=3)}
        print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    write_json(opts.json, results)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise SystemExit(f"sections failed: {failed}")
    return results


if __name__ == "__main__":
    main()
