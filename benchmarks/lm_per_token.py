"""Tiny GPT-2 per-token case: BIF against its plain-torch floor and against kronfluence EK-FAC, in one run.

    python benchmarks/lm_per_token.py                     # 3 repeats, 1 thread, prints a markdown table
    python benchmarks/lm_per_token.py --repeats 1 --json lm.json
    python benchmarks/lm_per_token.py --smoke             # tiny sizes, seconds: checks that it runs

The case (issue 15): a byte-level `GPT2LMHeadModel` built from a config (2 layers, width 128, 4 heads, 64
positions, vocabulary 256 = bytes, untied output layer, dropout off), briefly trained on CPython's pydoc help
texts (`pydoc_data.topics`, no download); 128 training and 8 query sequences of 64 bytes (queries from held-out
text, every token labelled). GPT-2's `Conv1D` layers are converted to the equivalent `nn.Linear` for every
method, so kronfluence tracks them: both methods see the same 9 linear modules (4 per block + `lm_head`,
428,288 weights); embeddings and LayerNorms are neither tracked nor sampled.

Methods, interleaved within each repeat (medians over repeats):
- floor: plain SGLD in a tight torch loop (`plain_floor.sgld_floor`): N_draws x (n + q) evaluation forwards
  (per-token losses) and N_draws x steps minibatch gradient steps, plus the float64 GEMMs of the
  token-by-token cross-moments [q T, n T].
- BIF: the package, `fit_all_factors` + `compute_pairwise_scores(ScoreArguments(compute_per_token_scores=True))`:
  the per-token scores [q, n, T] and the token-by-token matrix [q, T, n, T] from one sampling phase.
  4 chains x 50 draws, minibatch 16, plain SGLD, step 1e-4, nbeta 100, localization 1e3, no burn-in (`--burnin`).
- with `--compile`, BIF again with `BIFArguments(compile_evaluation=True)` (its compilation included).
- EK-FAC (kronfluence 1.0.1, its own Analyzer): `fit_all_factors` once per repeat, then per-token scores of
  the 8 queries [8, n, T], and token-by-token as kronfluence can: 504 single-token query items (one per labelled
  query token, 8 x 63) [504, n, T]. Each EK-FAC total includes the fit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, quiet, write_json  # noqa: E402
from plain_floor import FloorCase, package_run, sgld_floor, sync  # noqa: E402

from kronfluence_bif import BIFArguments, CausalLMTask  # noqa: E402

IGNORE = -100
ISSUE_ARGS = dict(
    sampler="sgld", num_chains=4, num_draws=50, num_burnin_steps=0, sampler_batch_size=16,
    step_size=1e-4, nbeta=100.0, localization=1e3,
)  # fmt: skip


class ByteSequences(Dataset):
    """Fixed-length byte sequences as Hugging Face-style dicts (`input_ids`, `attention_mask`, `labels`)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.labels = ids, labels
        self.attention_mask = torch.ones_like(ids)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def corpus_bytes() -> torch.Tensor:
    """CPython's pydoc help topics as bytes (ships with Python)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(data: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (count,), generator=gen)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def make_data(n: int, q: int, length: int, seed: int = 0):
    """(train, query, training bytes): n windows of the first 90% of the corpus, q of the held-out rest."""
    data, gen = corpus_bytes(), torch.Generator().manual_seed(seed)
    cut = int(0.9 * len(data))
    train_ids, query_ids = windows(data[:cut], n, length, gen), windows(data[cut:], q, length, gen)
    return ByteSequences(train_ids, train_ids.clone()), ByteSequences(query_ids, query_ids.clone()), data[:cut]


def single_token_queries(query: ByteSequences) -> ByteSequences:
    """One item per labelled query token: the whole sequence, labels -100 except that token (kronfluence's way)."""
    q, length = query.input_ids.shape
    ids = query.input_ids.repeat_interleave(length - 1, dim=0)
    labels = torch.full_like(ids, IGNORE)
    rows = torch.arange(len(ids))
    cols = torch.arange(1, length).repeat(q)
    labels[rows, cols] = ids[rows, cols]
    return ByteSequences(ids, labels)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Swap GPT-2's `Conv1D` (x @ W + b, W [in, out]) for the equivalent `nn.Linear`, in place."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(*child.weight.shape)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


def make_model(length: int = 64, width: int = 128, layers: int = 2, heads: int = 4, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256, n_positions=length, n_embd=width, n_layer=layers, n_head=heads, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return conv1d_to_linear(GPT2LMHeadModel(config))


def linear_names(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def train_briefly(model: nn.Module, data: torch.Tensor, length: int, steps: int, seed: int = 0) -> nn.Module:
    """AdamW on random windows: timings do not depend on how well the model is trained, SGLD's stability does."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = windows(data, 32, length, gen)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def per_token_loss(batch: Dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    """The floor's view: the loss of each next-byte prediction at its input position, [B, T] (last column 0)."""
    logits = model(input_ids=batch["input_ids"]).logits.float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return F.pad(losses, (0, 1))


def make_case(n: int, q: int, length: int, train_steps: int, device: torch.device, width: int = 128) -> Dict:
    """Model, task and data of the per-token case, and the floor's view of them (data cached on `device`)."""
    train, query, text = make_data(n, q, length)
    model = train_briefly(make_model(length, width).to(device), text.to(device), length, train_steps)
    names = [f"{m}.{p}" for m in linear_names(model) for p, _ in dict(model.named_modules())[m].named_parameters()]
    on_device = {
        k: {f: getattr(d, f).to(device) for f in ("input_ids", "labels")} for k, d in (("t", train), ("q", query))
    }

    def gather(side: str):
        return lambda idx: {f: t[idx.to(device)] for f, t in on_device[side].items()}

    floor = FloorCase(model, names, gather("t"), gather("q"), n, q, per_token_loss, eval_batch=n, query_batch=q)
    task = CausalLMTask(tracked_modules=linear_names(model))
    return dict(model=model, task=task, train=train, query=query, floor=floor)


def time_ekfac(case: Dict, tmp: str, query_batch: int) -> Dict[str, float]:
    """kronfluence's own Analyzer: fit, per-token scores of the queries, and of the single-token query items."""
    from kronfluence import Analyzer, ScoreArguments, prepare_model

    prepared = prepare_model(copy.deepcopy(case["model"]).cpu(), case["task"])
    analyzer = Analyzer("ekfac", prepared, case["task"], cpu=True, output_dir=tmp, disable_tqdm=True)
    args = ScoreArguments(compute_per_token_scores=True)
    train, query = case["train"], case["query"]
    out = {}
    start = time.perf_counter()
    analyzer.fit_all_factors("f", train, per_device_batch_size=32, overwrite_output_dir=True)
    out["fit"] = time.perf_counter() - start
    for label, items, bs in (
        ("per_token", query, len(query)),
        ("token_by_token", single_token_queries(query), query_batch),
    ):
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            label, "f", items, train, per_device_query_batch_size=bs, per_device_train_batch_size=32,
            score_args=args, overwrite_output_dir=True,
        )  # fmt: skip
        out[label] = time.perf_counter() - start
        out[f"{label}_shape"] = list(analyzer.load_pairwise_scores(label)["all_modules"].shape)
    return out


def one_repeat(case: Dict, args: BIFArguments, opts, device: torch.device) -> Dict[str, Any]:
    """Floor, BIF and EK-FAC back to back, so they share the machine's load."""
    n, q = len(case["train"]), len(case["query"])
    row: Dict[str, Any] = {"floor": sgld_floor(case["floor"], args, device)}
    cpu = device.type == "cpu"
    row["bif"] = package_run(case["model"], case["task"], case["train"], case["query"], args, n, q, True, cpu)
    if opts.compile:
        compiled = dataclasses.replace(args, compile_evaluation=True)
        row["bif_compiled"] = package_run(
            case["model"], case["task"], case["train"], case["query"], compiled, n, q, True, cpu
        )
    if not opts.skip_ekfac:
        with tempfile.TemporaryDirectory() as tmp:
            row.update(time_ekfac(case, tmp, opts.ekfac_query_batch))
    return row


def table(rows: List[Dict[str, Any]], load: str) -> str:
    """Markdown: median, range and ratio to the floor of each method (EK-FAC totals include its fit)."""
    entries = [("plain-torch floor (SGLD steps + per-token evaluation + GEMMs)", ["floor"])]
    entries.append(("BIF (package): per-token + token-by-token, one sampling phase", ["bif"]))
    if "bif_compiled" in rows[0]:
        entries.append(("BIF, compile_evaluation=True (compilation included)", ["bif_compiled"]))
    if "fit" in rows[0]:
        entries += [
            ("EK-FAC fit_all_factors alone", ["fit"]),
            ("EK-FAC per-token (fit + 8 queries)", ["fit", "per_token"]),
            ("EK-FAC token-by-token (fit + 504 single-token queries)", ["fit", "token_by_token"]),
        ]
    floor = statistics.median(r["floor"] for r in rows)
    lines = [
        f"load (uptime): {load}",
        "",
        "| method | time (s), median | min - max | / floor |",
        "|---|---:|---:|---:|",
    ]
    for label, keys in entries:
        total = [sum(r[k] for k in keys) for r in rows]
        m = statistics.median(total)
        lines.append(f"| {label} | {m:.2f} | {min(total):.2f} - {max(total):.2f} | {m / floor:.2f} |")
    return "\n".join(lines)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def main(argv: List[str] | None = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--burnin", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--ekfac-query-batch", type=int, default=504)
    parser.add_argument("--skip-ekfac", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also BIF with compile_evaluation=True")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (n 8, q 2, T 16, 2 x 3 draws), seconds")
    parser.add_argument("--json", default="")
    opts = parser.parse_args(argv)
    quiet(opts.threads, logging.WARNING)
    machine = describe_machine(opts.threads)
    device = torch.device("cpu")
    sizes = (
        dict(n=8, q=2, length=16, train_steps=2)
        if opts.smoke
        else dict(n=128, q=8, length=64, train_steps=opts.train_steps)
    )
    case = make_case(device=device, **sizes)
    smoke = dict(num_chains=2, num_draws=3, sampler_batch_size=4) if opts.smoke else {}
    args = BIFArguments(**{**ISSUE_ARGS, "num_burnin_steps": opts.burnin, **smoke})
    rows, load = [], uptime()
    for r in range(1 if opts.smoke else opts.repeats):
        rows.append(one_repeat(case, args, opts, device))
        print(json.dumps({"repeat": r, **rows[-1]}), flush=True)
    sync(device)
    print("\n" + table(rows, f"start: {load}; end: {uptime()}"))
    write_json(opts.json, {"machine": machine, "args": args.to_dict(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
