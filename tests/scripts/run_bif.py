"""BIF runs (pairwise + self scores) for the multi-process and resume tests; launched by python or torchrun.

    python tests/scripts/run_bif.py --data DIR --out DIR [--chains C] [--draws N] [--checkpoint-interval K]
        [--slow SECONDS] [--hang-final-write MARKER] [--ddp] [--only pairwise] [--next --data DIR --out DIR ...]

`--calibrate` runs `calibrate()` on a small grid instead and writes its table as JSON to `<out>/calibration.json`
(rank 0). `--next` starts another run's arguments: the runs go one after another in the same processes (one launch, one
import of torch per process, for several layouts' tests).

Every process logs the files it writes to `<out>/writes_rank<r>.txt` so the tests can check that one
process writes the results. `--slow` sleeps after each evaluation (to be killed mid-sampling);
`--hang-final-write` stops forever inside the write of `pairwise_scores.safetensors`, after its temporary
file is complete and before the rename.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import kronfluence_bif.storage as storage
from kronfluence_bif import Analyzer, BIFArguments, calibrate, prepare_model
from kronfluence_bif.engine import Evaluator
from kronfluence_bif.tasks import RegressionTask


def build_model(state: dict) -> nn.Module:
    d, h = state["0.weight"].shape[1], state["0.weight"].shape[0]
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1))
    model.load_state_dict(state)
    return model


class Untracked(nn.Module):
    """The same function as `build_model`'s MLP from bare parameters: nothing kronfluence can track."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        order = ["0.weight", "0.bias", "2.weight", "2.bias"]  # the MLP's order: the same noise, the same chains
        self.weights = nn.ParameterList([nn.Parameter(state[k].clone()) for k in order])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, b0, w2, b2 = self.weights
        return nn.functional.linear(torch.tanh(nn.functional.linear(x, w0, b0)), w2, b2)


LOG = {"path": None, "hang": ""}  # this run's write log and hang marker (set per run by `instrument`)
REAL_SAVES = (storage.save_file, storage.save_json)


def _save_file(tensors, filename, metadata=None):
    REAL_SAVES[0](tensors, filename, metadata=metadata)
    with open(LOG["path"], "a") as f:
        f.write(f"{filename}\n")
    if LOG["hang"] and Path(filename).name.startswith(".pairwise_scores.safetensors."):
        Path(LOG["hang"]).write_text(str(filename))
        time.sleep(3600)


def _save_json(obj, path):
    REAL_SAVES[1](obj, path)
    with open(LOG["path"], "a") as f:
        f.write(f"{path}\n")


def instrument(out: Path, rank: int, slow: float, hang_marker: str) -> None:
    LOG["path"], LOG["hang"] = out / f"writes_rank{rank}.txt", hang_marker
    storage.save_file, storage.save_json = _save_file, _save_json
    if slow > 0:
        real_evaluate = Evaluator.evaluate

        def evaluate(self, row, mine, *rest):
            result = real_evaluate(self, row, mine, *rest)
            time.sleep(slow)
            return result

        Evaluator.evaluate = evaluate


def inject_failure(after: int) -> None:
    """This process alone fails mid-sampling (as an out-of-memory error on its own batches would)."""
    real_evaluate, calls = Evaluator.evaluate, [0]

    def evaluate(self, row, mine, *rest):
        calls[0] += 1
        if calls[0] == after:
            raise RuntimeError("injected failure")
        return real_evaluate(self, row, mine, *rest)

    Evaluator.evaluate = evaluate


def main() -> None:
    argv, runs = sys.argv[1:], [[]]
    for arg in argv:
        if arg == "--next":
            runs.append([])
        else:
            runs[-1].append(arg)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("kronfluence_bif").setLevel(logging.INFO)
    for run_args in runs:
        run(run_args)


def run(argv: list) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--checkpoint-interval", type=int, default=100)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--hang-final-write", default="")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--untracked", action="store_true", help="the MLP from bare parameters (nothing tracked)")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises in its 40th evaluation")
    parser.add_argument("--batch-chains", action="store_true", help="BIFArguments(batch_chains=True): lockstep")
    parser.add_argument("--defaults", action="store_true", help="BIFArguments() but for chains, draws, checkpoints")
    parser.add_argument("--calibrate", action="store_true", help="calibrate() on a 3-step grid, its table as JSON")
    opts = parser.parse_args(argv)
    if opts.calibrate:
        return calibration(Path(opts.data), Path(opts.out))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    instrument(out, rank, opts.slow, opts.hang_final_write)
    if opts.fail_rank == rank:
        inject_failure(after=40)

    data = load_file(str(Path(opts.data) / "data.safetensors"))
    train = TensorDataset(data["x_train"], data["y_train"])
    query = TensorDataset(data["x_query"], data["y_query"])
    task = RegressionTask()
    state = load_file(str(Path(opts.data) / "model.safetensors"))
    model = prepare_model(Untracked(state) if opts.untracked else build_model(state), task)
    if opts.ddp:
        from accelerate import PartialState

        PartialState(cpu=True)  # initialises gloo under torchrun
        model = nn.parallel.DistributedDataParallel(model)
    bif_args = BIFArguments(
        sampler="rmsprop_sgld",  # the default when the pins were recorded
        num_chains=opts.chains,
        num_draws=opts.draws,
        num_burnin_steps=20,
        sampler_batch_size=16,
        draws_per_block=16,
        checkpoint_interval=opts.checkpoint_interval,
        step_size=1e-3,
        nbeta=100.0,
        localization=100.0,
        batch_chains=True if opts.batch_chains else None,
    )
    if opts.defaults:  # the package's defaults ("auto": subspace-SGLD on this MLP), fewer draws
        bif_args = BIFArguments(
            num_chains=opts.chains, num_draws=opts.draws, checkpoint_interval=opts.checkpoint_interval
        )
    # kronfluence refuses cpu=True with a DDP-wrapped model; without CUDA its device is the CPU anyway
    analyzer = Analyzer("dist", model, task, cpu=not opts.ddp, output_dir=str(out), disable_tqdm=True, strategy="bif")
    try:
        analyzer.fit_all_factors("bif", train, bif_args=bif_args)
        kw = dict(per_device_train_batch_size=8)
        analyzer.compute_pairwise_scores("pw", "bif", query, train, per_device_query_batch_size=4, **kw)
        if opts.only != "pairwise":
            analyzer.compute_self_scores("self", "bif", train, **kw)
    finally:
        if opts.ddp:
            # this script started the group, so it closes it, as any DDP script must: gloo threads still alive at
            # interpreter exit abort the process ("terminate called without an active exception") now and then
            torch.distributed.destroy_process_group()


def calibration(data_dir: Path, out: Path) -> None:
    """Calibrate the MLP on a small grid; rank 0 writes the table rows and the recommended step."""
    data = load_file(str(data_dir / "data.safetensors"))
    task = RegressionTask()
    model = prepare_model(build_model(load_file(str(data_dir / "model.safetensors"))), task)
    base = BIFArguments(sampler="sgld", step_size=1e-3, nbeta=100.0, localization=100.0, num_burnin_steps=5)
    result = calibrate(
        model,
        task,
        TensorDataset(data["x_train"], data["y_train"]),
        base_args=base,
        step_sizes=[1e-4, 1e-3, 1e-2],
        num_chains=2,
        num_draws=20,
        disable_tqdm=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        rows = storage.jsonable(result.rows)  # NaN (an undefined R-hat) as null, so the files compare equal
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps({"rows": rows, "step": result.recommended.step_size}))


if __name__ == "__main__":
    main()
