"""Chains in lockstep through the package: `BIFArguments(batch_chains=True)` vs one chain at a time, same run.

    python benchmarks/batched_engine.py                  # UCI MLP and tiny GPT-2, 4 chains, 1 thread, 3 repeats
    python benchmarks/batched_engine.py --cases uci --repeats 5 --json lockstep.json
    python benchmarks/batched_engine.py --smoke          # tiny sizes, seconds: checks that it runs
    python benchmarks/batched_engine.py --cuda           # on the GPU (where batch_chains=None turns lockstep on)

Each repeat runs both modes alternately (order swapped every repeat) on the same prepared model: the Analyzer's
`fit_all_factors` + `compute_pairwise_scores`, timed together; medians over repeats. The cases:
- uci: the demo's UCI concrete MLP (8-128-128-128-1, n = 927, q = 103), plain SGLD, 4 chains x 50 draws, the
  package's other defaults (burn-in 100, minibatch 64).
- gpt2: a byte-level `GPT2LMHeadModel` from a config (2 layers, width 128, 4 heads, 64 positions, eager
  attention, dropout off), trained 60 Adam steps on CPython's pydoc texts; 128 training and 8 query sequences of
  64 bytes; per-token scores with the token-by-token matrix; plain SGLD step 1e-4, nbeta 100, localization 1e3,
  minibatch 16, no burn-in, 4 chains x 50 draws; the attention and MLP projections and the output layer sampled.
Also prints the largest difference of the two modes' scores relative to the largest score (float32 rounding).
Not a test.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, quiet, write_json  # noqa: E402

from kronfluence_bif import (  # noqa: E402
    Analyzer,
    BIFArguments,
    CausalLMTask,
    RegressionTask,
    ScoreArguments,
    prepare_model,
)

Case = Tuple[torch.nn.Module, Any, Any, Any, Dict[str, Any], Dict[str, Any]]  # model, task, train, query, bif, kw


def uci_case(smoke: bool) -> Case:
    from kronfluence_bif.demo.uci import load_concrete, train_mlp

    train, query = load_concrete()
    model = train_mlp(train, epochs=2 if smoke else 20)
    task = RegressionTask()
    bif = dict(sampler="sgld", num_draws=4 if smoke else 50, num_burnin_steps=5 if smoke else 100)
    return prepare_model(model, task), task, train, query, bif, {}


class Sequences(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def gpt2_case(smoke: bool) -> Case:
    from pydoc_data.topics import topics

    import transformers

    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace")
    data = torch.tensor(list(text[: 200 * 64]), dtype=torch.long).view(200, 64)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"  # plain matmuls: vmap batches them (the CPU sdpa kernel has no rule)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(5 if smoke else 60):
        batch = data[(16 * step) % 128 :][:16]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    model.eval()
    n, q = (16, 2) if smoke else (128, 8)
    train, query = Sequences(data[:n]), Sequences(data[128 : 128 + q])
    task = CausalLMTask()
    patterns = ["*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj", "lm_head"]
    bif = dict(sampler="sgld", num_draws=3 if smoke else 50, num_burnin_steps=0, sampler_batch_size=16)
    bif.update(step_size=1e-4, nbeta=100.0, localization=1e3, sampled_modules=patterns)
    kw = dict(score_args=ScoreArguments(compute_per_token_scores=True), per_device_train_batch_size=32)
    return prepare_model(model, task), task, train, query, bif, kw


CASES: Dict[str, Callable[[bool], Case]] = {"uci": uci_case, "gpt2": gpt2_case}


def package_run(case: Case, batch_chains: bool, chains: int, folder: str, cuda: bool) -> Tuple[float, torch.Tensor]:
    """Seconds of `fit_all_factors` + `compute_pairwise_scores`, and the scores."""
    model, task, train, query, bif, kw = case
    args = BIFArguments(num_chains=chains, num_threads=1, checkpoint_interval=0, batch_chains=batch_chains, **bif)
    analyzer = Analyzer("b", model, task, cpu=not cuda, output_dir=folder, disable_tqdm=True, strategy="bif")
    start = time.perf_counter()
    analyzer.fit_all_factors("f", dataset=train, bif_args=args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "s",
        "f",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=8,
        overwrite_output_dir=True,
        **kw,
    )
    seconds = time.perf_counter() - start  # the scores are read back from disk: the device is synchronized
    return seconds, analyzer.load_pairwise_scores("s")["all_modules"]


def measure(name: str, chains: int, repeats: int, smoke: bool, cuda: bool) -> Dict[str, Any]:
    case = CASES[name](smoke)
    times: Dict[bool, List[float]] = {False: [], True: []}
    scores: Dict[bool, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as folder:
        package_run(case, True, chains, folder, cuda)  # warm-up (first vmap traces, allocator)
        for r in range(repeats):
            for mode in (False, True) if r % 2 == 0 else (True, False):
                seconds, scores[mode] = package_run(case, mode, chains, folder, cuda)
                times[mode].append(seconds)
    loop, lockstep = statistics.median(times[False]), statistics.median(times[True])
    scale = scores[False].double().abs().max().clamp_min(1e-30)
    return {
        "case": name,
        "chains": chains,
        "loop_s": loop,
        "lockstep_s": lockstep,
        "gain": loop / lockstep,
        "rel_diff": float((scores[True].double() - scores[False].double()).abs().max() / scale),
        "times": {"loop": times[False], "lockstep": times[True]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU (the Analyzer's device)")
    parser.add_argument("--json", default="")
    opts = parser.parse_args()
    quiet(1, level=logging.ERROR)
    machine = describe_machine(1)
    repeats = 1 if opts.smoke else opts.repeats
    rows = [measure(name, opts.chains, repeats, opts.smoke, opts.cuda) for name in opts.cases]
    print("| case | chains | one at a time (s) | lockstep (s) | gain | scores rel. diff |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['chains']} | {row['loop_s']:.2f} | {row['lockstep_s']:.2f} | "
            f"{row['gain']:.2f}x | {row['rel_diff']:.1e} |"
        )
    write_json(opts.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
