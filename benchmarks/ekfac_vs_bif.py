"""EK-FAC vs BIF: wall time and peak memory on the same Task and data, for models of growing width.

    python benchmarks/ekfac_vs_bif.py                                   # MLPs 128..1024 and GPT-2s 128, 256
    python benchmarks/ekfac_vs_bif.py --mlp-widths 2048 --gpt-widths --repeats 1
    python benchmarks/ekfac_vs_bif.py --bif defaults --json sweep.json

Cases:
- MLP 32 -> W -> W -> W -> 1 (tanh), regression on a random teacher, n = 2048 train, q = 128 query.
- GPT-2 (2 layers, width W, 4 heads) on character sequences of pydoc text (T = 64), 256 train sequences,
  8 prompt/completion queries: sequence-level scores and per-token scores (kronfluence's compute_per_token_scores).
BIF settings: the package defaults (RMSprop-SGLD, 4 x 400 draws, m 64) and the paper's
Table 3 "Scaling" row (plain SGLD, m 32, 4 x 500 draws, no burn-in, eps 5e-6, nbeta 30, gamma 300). EK-FAC:
fit_all_factors + compute_pairwise_scores.
Each cell: median wall time over --repeats and the peak resident memory above the start of the call (Linux
VmHWM), each measured in a fresh process. Not a test: about 20 minutes on 2 cores with the default cases.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import tempfile
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from common import describe_machine, quiet, write_json
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import (
    Analyzer,
    BIFArguments,
    CausalLMTask,
    FactorArguments,
    RegressionTask,
    ScoreArguments,
    prepare_model,
)
from kronfluence_bif.usage import measure

PAPER_SCALING = dict(
    sampler="sgld", sampler_batch_size=32, num_chains=4, num_draws=500, num_burnin_steps=0,
    step_size=5e-6, nbeta=30.0, localization=300.0,
)  # fmt: skip
BIF_SETTINGS = {"defaults": {}, "paper scaling row": PAPER_SCALING}


def mlp_case(width: int, n: int = 2048, q: int = 128, d: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + q, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, 1, generator=g)) + 0.1 * torch.randn(n + q, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    model.append(nn.Linear(width, width)).append(nn.Tanh()).append(nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        idx = torch.randint(0, n, (128,), generator=g)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    task = RegressionTask()
    data = dict(train=TensorDataset(x[:n], y[:n]), query=TensorDataset(x[n:], y[n:]), batch=512, query_batch=q)
    return model.eval(), task, data


def gpt_case(width: int, n: int = 256, q: int = 8, context: int = 64):
    from kronfluence_bif.demo import tiny_lm as lm

    text = lm.load_corpus()
    tokenizer = lm.CharTokenizer.from_text(text)
    split = lm.split_corpus(text)
    train, _ = lm.make_train_dataset(tokenizer, split.train_paragraphs, context, n)
    queries, _ = lm.make_queries(tokenizer, split.heldout_paragraphs, split.train_text, q, context)
    model = lm.conv1d_to_linear(lm.make_model(len(tokenizer), n_embd=width, context=context))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    task = CausalLMTask()
    model.train()
    for _ in range(3):  # a few epochs: timings do not depend on how well it is trained
        for batch in loader:
            opt.zero_grad()
            task.compute_train_loss(batch, model).div(batch["input_ids"].numel()).backward()
            opt.step()
    task = CausalLMTask(tracked_modules=lm.linear_module_names(model))
    return model.eval(), task, dict(train=train, query=queries, batch=32, query_batch=q)


def measure_in_child(case_file: str, method: str, per_token: bool, bif: Dict[str, Any], threads: int):
    """One measurement in a fresh process, so its peak memory is not hidden by what an earlier one freed."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_child, (case_file, method, per_token, bif, threads))


def _child(case_file: str, method: str, per_token: bool, bif: Dict[str, Any], threads: int) -> Dict[str, float]:
    quiet(threads)
    model, task, data = torch.load(case_file, weights_only=False)
    return time_method(model, task, data, method, per_token, bif)


def time_method(model, task, data, method: str, per_token: bool, bif: Dict[str, Any]) -> Dict[str, float]:
    prepared = prepare_model(copy.deepcopy(model), task)
    score_args = ScoreArguments(compute_per_token_scores=per_token)
    common = dict(
        per_device_query_batch_size=data["query_batch"],
        per_device_train_batch_size=data["batch"],
        score_args=score_args,
        overwrite_output_dir=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", prepared, task, cpu=True, output_dir=tmp, disable_tqdm=True)
        with measure() as usage:
            if method == "ekfac":
                analyzer.fit_all_factors("f", data["train"], per_device_batch_size=data["batch"])
            else:
                analyzer.fit_all_factors(
                    "f", data["train"], factor_args=FactorArguments(strategy="bif"), bif_args=BIFArguments(**bif)
                )
            analyzer.compute_pairwise_scores("s", "f", data["query"], data["train"], **common)
    return {"seconds": usage.seconds, "peak_mib": usage.peak_delta_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-widths", type=int, nargs="*", default=[128, 256, 512, 1024])
    parser.add_argument("--gpt-widths", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--bif", nargs="+", default=list(BIF_SETTINGS), choices=list(BIF_SETTINGS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    quiet(opts.threads)
    machine = describe_machine(opts.threads)
    cases = [("mlp", w, False) for w in opts.mlp_widths]
    cases += [("gpt", w, per_token) for w in opts.gpt_widths for per_token in (False, True)]
    rows: List[Dict[str, Any]] = []
    tmp_dir = tempfile.mkdtemp(prefix="ekfac_vs_bif_")
    for kind, width, per_token in cases:
        model, task, data = mlp_case(width) if kind == "mlp" else gpt_case(width)
        weights = sum(p.numel() for p in model.parameters())
        case_file = os.path.join(tmp_dir, f"{kind}{width}.pt")
        torch.save((model, task, data), case_file)
        methods = [("EK-FAC", "ekfac", {})] + [(f"BIF {k}", "bif", BIF_SETTINGS[k]) for k in opts.bif]
        for label, method, bif in methods:
            runs = [measure_in_child(case_file, method, per_token, bif, opts.threads) for _ in range(opts.repeats)]
            row = {
                "case": f"{kind} {width}" + (" per-token" if per_token else ""),
                "weights": weights,
                "n_train": len(data["train"]),
                "n_query": len(data["query"]),
                "method": label,
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | weights | n x q | method | time (s) | peak RSS increase (MiB) |\n|---|---:|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['weights']:,} | {r['n_train']} x {r['n_query']} | {r['method']} | "
            f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |"
        )
    write_json(opts.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
