"""Issue 15's `torch.compile` question: does compiling the evaluation views pay for itself on the benchmark cases?

    python benchmarks/compile_views.py --cases uci gpt2 --repeats 7

A draw's unavoidable work is the per-example (per-token) values of every train and query example. This script
times exactly that evaluation, eager against `torch.compile(view, dynamic=False)` (inductor, the default mode), on
the demo UCI MLP (927 + 103 examples) and on `lm_per_token.py`'s tiny GPT-2 (128 + 8 sequences of 64 bytes, the
full per-token matrix), under `torch.inference_mode` on one thread, eager and compiled alternating per repeat. It
prints the compile time (first call of both batch shapes), the median milliseconds per evaluation and the break-even
number of draws (compile time / time saved per draw). The weights are updated in place between repeats, as a chain
does, to show whether the compiled view recompiles (it must not) and stays equal to the eager one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, quiet  # noqa: E402
from plain_floor import FloorCase, uci_case  # noqa: E402


def _gpt2_case() -> FloorCase:
    from lm_per_token import make_case

    return make_case(128, 8, 64, train_steps=20, device=torch.device("cpu"))["floor"]


def _evaluation(case: FloorCase, view: Callable) -> Callable[[], List[torch.Tensor]]:
    batches = [case.gather_train(torch.arange(case.n_train)), case.gather_query(torch.arange(case.n_query))]
    return lambda: [view(batch, case.model) for batch in batches]


def _ms_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def measure(name: str, case: FloorCase, repeats: int, calls: int) -> str:
    eager = _evaluation(case, case.values)
    compiled_view = torch.compile(case.values, dynamic=False)
    compiled = _evaluation(case, compiled_view)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - start
        times = {"eager": [], "compiled": []}
        worst = 0.0
        for repeat in range(repeats):
            with torch.no_grad():  # a chain's in-place weight update
                for p in case.model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-4)
            for label, fn in (("eager", eager), ("compiled", compiled))[:: 1 if repeat % 2 == 0 else -1]:
                fn()  # warm
                times[label].append(_ms_per_call(fn, calls))
            worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(eager(), compiled())))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    saved = e - c
    breakeven = f"{compile_s / saved * 1e3:.0f}" if saved > 0 else "never"
    return (
        f"| {name} | {compile_s:.1f} | {e:.2f} | {c:.2f} | {e / c:.2f}x | {breakeven} | {worst:.1e} |\n"
        f"  eager per repeat: {', '.join(f'{t:.2f}' for t in times['eager'])}; "
        f"compiled: {', '.join(f'{t:.2f}' for t in times['compiled'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["uci", "gpt2"], choices=["uci", "gpt2"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=0, help="evaluations per repeat (default: 200 UCI, 5 GPT-2)")
    opts = parser.parse_args()
    quiet(1)
    describe_machine(1)
    print(
        "| case | compile (s) | eager ms / draw | compiled ms / draw | gain | break-even draws | max abs diff |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for name in opts.cases:
        case = uci_case(torch.device("cpu"))["floor"] if name == "uci" else _gpt2_case()
        calls = opts.calls or (200 if name == "uci" else 5)
        print(measure(name, case, opts.repeats, calls), flush=True)


if __name__ == "__main__":
    main()
