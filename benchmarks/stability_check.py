"""Does a sampler setting stay stable on the wide 3x1024 MLP of floor.py (2.1M weights)? A short run, not LDS.

    python benchmarks/stability_check.py --bif '{"nbeta": 1e4, "localization": 100}' --subspace

Runs `compute_pairwise_scores` with sketch-SGLD (optionally the span-restricted prototype of
`subspace_sampler.SubspaceSketchSGLD`) for a few draws and prints whether it diverged, the loss at w* and over the
draws, the distance from w*, R-hat and the ESS fraction from `bif_diagnostics.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import quiet
from error_budget import chain_health
from floor import make_case
from subspace_sampler import SubspaceSketchSGLD
from torch.func import functional_call, jvp

import kronfluence_bif.engine as engine
from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model


def gauss_newton_ritz(model: torch.nn.Module, inputs: torch.Tensor, original):
    """sketch_fisher, then Rayleigh-Ritz with the mean Gauss-Newton 2 J^T J / n of the squared error on its span.

    One forward-mode pass over the training inputs per basis vector (J v_j for every example): what the library
    would run once per run to get the sketch's eigenvalues right.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def refined(sampled_loss, batches, weights, batch_size):
        sketch = original(sampled_loss, batches, weights, batch_size)
        assert [tuple(w.shape) for w in weights] == [tuple(v.shape) for v in params.values()]
        columns = []
        for row in sketch.basis:
            tangent, offset = {}, 0
            for k, v in params.items():
                tangent[k] = row[offset : offset + v.numel()].view_as(v)
                offset += v.numel()
            _, jv = jvp(lambda p: functional_call(model, p, (inputs,)), (params,), (tangent,))
            columns.append(jv.reshape(-1).double())
        d = torch.stack(columns, 1)  # [n, k] = J V
        evals, evecs = torch.linalg.eigh(2 * d.T @ d / len(inputs))
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        basis = (evecs.T.to(sketch.basis) @ sketch.basis).contiguous()
        return type(sketch)(basis=basis, eigenvalues=evals.to(sketch.eigenvalues))

    return refined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bif", default="{}", help="JSON BIFArguments overrides")
    parser.add_argument("--subspace", action="store_true")
    args = parser.parse_args()
    quiet(1)
    train, query, model = make_case("mlp")
    task = RegressionTask()
    plain = copy.deepcopy(model)
    model = prepare_model(model, task)
    settings = {
        "sampler": "sketch_sgld",
        "num_chains": 2,
        "num_draws": 40,
        "num_burnin_steps": 20,
        "sketch_rank": 64,
        "sampler_batch_size": 256,
        "checkpoint_interval": 0,
        **json.loads(args.bif),
    }
    if args.subspace:
        engine.SketchSGLD = SubspaceSketchSGLD
        engine.sketch_fisher = gauss_newton_ritz(plain, train.tensors[0], engine.sketch_fisher)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("wide", model, task, cpu=True, output_dir=tmp, disable_tqdm=True)
        start = time.perf_counter()
        result = {"subspace": args.subspace, **settings}
        try:
            analyzer.fit_all_factors("bif", dataset=train, bif_args=BIFArguments(**settings))
            analyzer.compute_pairwise_scores(
                "bif", "bif", query_dataset=query, train_dataset=train, per_device_query_batch_size=len(query)
            )
            folder = Path(tmp) / "wide" / "scores_bif"
            diag = json.loads((folder / "bif_diagnostics.json").read_text())
            chains = diag["chains"]
            result.update(
                diverged=False,
                loss_at_w_star=chains[0]["initial_mean_loss"],
                mean_loss=[round(c["mean_loss"], 4) for c in chains],
                max_distance=[round(c["max_distance_from_w_star"], 3) for c in chains],
                warnings=[w["code"] for w in diag["warnings"]],
                **chain_health(folder, settings["num_draws"]),
            )
        except Exception as exc:  # noqa: BLE001 - divergence is the result
            result.update(diverged=True, error=str(exc).splitlines()[0][:200])
        result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
