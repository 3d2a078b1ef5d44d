"""Calibrate the multi-process test's MLP on a small grid and write the table rows as JSON (rank 0 only).

python tests/scripts/run_calibrate.py --data DIR --out FILE      (or under torchrun)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from run_bif import build_model
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from kronfluence_bif import BIFArguments, calibrate, prepare_model, storage
from kronfluence_bif.tasks import RegressionTask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    data = load_file(str(Path(opts.data) / "data.safetensors"))
    task = RegressionTask()
    model = prepare_model(build_model(load_file(str(Path(opts.data) / "model.safetensors"))), task)
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
        Path(opts.out).write_text(json.dumps({"rows": rows, "step": result.recommended.step_size}))


if __name__ == "__main__":
    main()
