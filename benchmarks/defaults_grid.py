"""Reproduce README's "Defaults" table: LDS and agreement with EK-FAC for a grid of BIF settings.

    python benchmarks/defaults_grid.py --task uci --retrains 60
    python benchmarks/defaults_grid.py --task digits --retrains 40 --grid '[{"step_size": 1e-4}]'

LDS: train on K random halves of the training set, record the query losses, and correlate (Spearman per query,
averaged) them with the prediction -masks @ scores.T (kronfluence's sign). Retrains are cached in --cache.
Not a test: it takes minutes (retraining dominates).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, ClassificationTask, FactorArguments, RegressionTask, prepare_model
from kronfluence_bif.demo.__main__ import agreement as demo_agreement
from kronfluence_bif.demo.digits import load_digits_split, train_classifier
from kronfluence_bif.demo.uci import load_concrete, train_mlp
from kronfluence_bif.lds import linear_datamodeling_score

warnings.filterwarnings("ignore", category=FutureWarning)


def task_setup(name: str):
    if name == "uci":
        train, query = load_concrete()

        def fit(data, seed):
            return train_mlp(data, epochs=100, seed=seed)

        def query_losses(model):
            return ((model(query.tensors[0]) - query.tensors[1]) ** 2).sum(1)

        return train, query, fit, query_losses, RegressionTask()
    train, query = load_digits_split()

    def fit(data, seed):
        return train_classifier(data, seed=seed)

    def query_losses(model):
        return torch.nn.functional.cross_entropy(model(query.tensors[0]), query.tensors[1], reduction="none")

    return train, query, fit, query_losses, ClassificationTask()


def retrain_losses(train, fit, query_losses, k: int, cache: Path):
    if cache.exists():
        data = np.load(cache)
        if len(data["masks"]) >= k:
            return data["masks"][:k].astype(float), data["losses"][:k]
    n = len(train)
    rng = np.random.RandomState(123)
    masks, losses = np.zeros((k, n), bool), []
    for i in range(k):
        idx = rng.choice(n, n // 2, replace=False)
        masks[i, idx] = True
        subset = TensorDataset(*[t[torch.tensor(idx)] for t in train.tensors])
        model = fit(subset, 1000 + i)
        with torch.no_grad():
            losses.append(query_losses(model).numpy())
        print(f"retrain {i + 1}/{k}", flush=True)
    np.savez(cache, masks=masks, losses=np.stack(losses))
    return masks.astype(float), np.stack(losses)


def lds(scores, masks, losses):
    return linear_datamodeling_score(scores, masks, losses).mean


def agreement(ref, scores):
    result = demo_agreement(ref, scores)
    return result["spearman"], result["top10_overlap"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument(
        "--grid",
        default='[{}, {"sampler": "sgld", "step_size": 1e-4, "nbeta": 100}]',
        help="JSON list of BIFArguments overrides; {} is the defaults",
    )
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    train, query, fit, query_losses, task = task_setup(args.task)
    masks, losses = retrain_losses(train, fit, query_losses, args.retrains, out / f"{args.task}_retrains.npz")
    model = prepare_model(fit(train, 0), task)
    analyzer = Analyzer(args.task, model, task, cpu=True, output_dir=str(out), disable_tqdm=True)
    common = dict(
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=len(train),
        overwrite_output_dir=True,
    )
    rows = []
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=len(train), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("ekfac", "ekfac", **common)
    ekfac = analyzer.load_pairwise_scores("ekfac")["all_modules"].numpy()
    rows.append({"setting": "EK-FAC", "seconds": time.perf_counter() - start, "lds": lds(ekfac, masks, losses)})
    analyzer.fit_all_factors(
        "identity", dataset=train, factor_args=FactorArguments(strategy="identity"), overwrite_output_dir=True
    )
    analyzer.compute_pairwise_scores("identity", "identity", **common)
    ident = analyzer.load_pairwise_scores("identity")["all_modules"].numpy()
    rows.append(
        {"setting": "identity", "lds": lds(ident, masks, losses), "spearman_vs_ekfac": agreement(ekfac, ident)[0]}
    )
    for i, overrides in enumerate(json.loads(args.grid)):
        name = f"bif{i}"
        start = time.perf_counter()
        try:
            analyzer.fit_all_factors(
                name,
                dataset=train,
                factor_args=FactorArguments(strategy="bif"),
                bif_args=BIFArguments(**overrides),
                overwrite_output_dir=True,
            )
            analyzer.compute_pairwise_scores(name, name, **common)
        except Exception as exc:  # noqa: BLE001 - a diverging setting is a result of the grid, not a crash
            rows.append({"setting": overrides or "defaults", "error": str(exc).splitlines()[0][:160]})
            continue
        scores = analyzer.load_pairwise_scores(name)["all_modules"].numpy()
        rho, top = agreement(ekfac, scores)
        rows.append(
            {
                "setting": overrides or "defaults",
                "seconds": time.perf_counter() - start,
                "lds": lds(scores, masks, losses),
                "spearman_vs_ekfac": rho,
                "top10_overlap": top,
            }
        )
    print(f"\n{args.task}: {len(train)} train, {len(query)} query, {len(masks)} retrains, torch {torch.__version__}")
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    (out / f"{args.task}_grid.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
