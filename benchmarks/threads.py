"""Time per SGLD step + draw of larger models at 1 and 2 intra-op threads, and with the package's thread rule.

    python benchmarks/threads.py --cases mlp1024 gpt2 --threads 1 2 auto

Run it alone and next to other CPU-bound work (e.g. `benchmarks/shared_cpu.py`'s hogs, or another job) to see
what the rule of `kronfluence_bif.threads` chooses and what each count costs. One chain x (5 burn-in + 30 draws),
checkpoints off. `mlp1024` is the 3x1024 GELU MLP of `benchmarks/floor.py` on a random teacher (n 2048, q 128);
`gpt2` is `examples/tiny_lm`'s model shape (2 layers x 128, T 64, untrained) with 512 posterior sequences and 6
queries, per-sequence scores.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from common import describe_machine, write_json
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, CausalLMTask, RegressionTask, prepare_model

DRAWS, BURNIN = 30, 5


def mlp1024() -> Tuple[nn.Module, Any, Any, Any, Dict[str, Any], Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 8, generator=g), torch.randn(2048, 1, generator=g)
    width = 1024
    layers = [nn.Linear(8, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    return model, RegressionTask(), TensorDataset(x, y), TensorDataset(x[:128], y[:128]), {}, {}


def gpt2() -> Tuple[nn.Module, Any, Any, Any, Dict[str, Any], Dict[str, Any]]:
    from kronfluence_bif.demo import tiny_lm

    text = tiny_lm.load_corpus()
    tokenizer, split = tiny_lm.CharTokenizer.from_text(text), tiny_lm.split_corpus(text)
    train, _ = tiny_lm.make_train_dataset(tokenizer, split.train_paragraphs, 64, 512)
    queries, _ = tiny_lm.make_queries(tokenizer, split.heldout_paragraphs, split.train_text, 6, 64)
    model = tiny_lm.conv1d_to_linear(tiny_lm.make_model(len(tokenizer)))
    task = CausalLMTask(tracked_modules=tiny_lm.linear_module_names(model))
    return model, task, train, queries, {"per_device_train_batch_size": 32}, {"sampler_batch_size": 32}


CASES = {"mlp1024": mlp1024, "gpt2": gpt2}


def per_draw_ms(case: str, threads: Optional[int]) -> Tuple[float, str]:
    """Milliseconds per SGLD step + draw, and the thread choice the run logged."""
    model, task, train, queries, score_kw, bif_kw = CASES[case]()
    model = prepare_model(model, task)
    analyzer = Analyzer("threads", model, task, cpu=True, output_dir="threads_bench", disable_tqdm=True, strategy="bif")
    args = BIFArguments(
        sampler="rmsprop_sgld",
        num_chains=1,
        num_draws=DRAWS,
        num_burnin_steps=BURNIN,
        checkpoint_interval=0,
        num_threads=threads,
        **bif_kw,
    )
    analyzer.fit_all_factors("f", train, bif_args=args, overwrite_output_dir=True)
    choices = []
    handler = logging.Handler()
    handler.emit = lambda record: choices.append(record.getMessage()) if "CPU thread" in record.getMessage() else None
    logging.getLogger("kronfluence_bif").addHandler(handler)
    start = time.perf_counter()
    try:
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            query_dataset=queries,
            train_dataset=train,
            per_device_query_batch_size=len(queries),
            overwrite_output_dir=True,
            **score_kw,
        )
    finally:
        logging.getLogger("kronfluence_bif").removeHandler(handler)
    return 1000 * (time.perf_counter() - start) / (DRAWS + BURNIN), choices[0] if choices else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"], help="counts, or auto for the rule")
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("kronfluence_bif").setLevel(logging.INFO)
    machine = describe_machine(torch.get_num_threads())
    rows = []
    for case in opts.cases:
        for value in opts.threads:
            ms, choice = per_draw_ms(case, None if value == "auto" else int(value))
            rows.append({"case": case, "threads": value, "ms_per_step_and_draw": ms, "choice": choice})
            print(f"{case:8s} threads {value:4s} {ms:7.0f} ms per step + draw   {choice}", flush=True)
    write_json(opts.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
