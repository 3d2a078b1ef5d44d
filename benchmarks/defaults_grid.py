"""Reproduce README's "Defaults" table: LDS and agreement with EK-FAC for a grid of BIF settings.

    python benchmarks/defaults_grid.py --task uci --retrains 60
    python benchmarks/defaults_grid.py --task uci --retrains 60 --fractions 0.5 0.1 --grid '[{"nbeta": 3e4}]'
    python benchmarks/defaults_grid.py --task digits --retrains 40 \
        --grid '[{"sampler": "rmsprop_sgld", "step_size": 1e-4}]'

LDS: train on K random subsets (halves by default; `--fractions` lists the retrain fractions, one LDS column each) of
the training set, record the query losses, and correlate (Spearman per query, averaged) them with the prediction
-masks @ scores.T (kronfluence's sign). Retrains are cached in --cache.
Not a test: it takes minutes (retraining dominates).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, ClassificationTask, RegressionTask, prepare_model
from kronfluence_bif.compare import compare
from kronfluence_bif.demo.digits import load_digits_split, train_classifier
from kronfluence_bif.demo.uci import load_concrete, train_mlp
from kronfluence_bif.lds import linear_datamodeling_score, score_pairwise
from kronfluence_bif.threads import set_threads

warnings.filterwarnings("ignore", category=FutureWarning)


# retrain caches measured before a change of the measurement stay apart: digits' query losses are precise
# cross-entropies since 2026-12-03 (float32 rounds a confident query's loss; BENCHMARKS.md, "Loss precision")
CACHE_TAGS = {"digits": "_precise"}


def task_setup(name: str):
    if name == "uci":
        train, query = load_concrete()

        def fit(data, seed):
            return train_mlp(data, epochs=100, seed=seed)

        task = RegressionTask()

        def query_losses(model):
            return task.compute_per_example_measurement(query.tensors, model)

        return train, query, fit, query_losses, task
    train, query = load_digits_split()

    def fit(data, seed):
        return train_classifier(data, seed=seed)

    task = ClassificationTask()

    def query_losses(model):  # the Task's own (precise) cross-entropy: float32's rounds a confident query's loss
        return task.compute_per_example_measurement(query.tensors, model)

    return train, query, fit, query_losses, task


def retrain_losses(train, fit, query_losses, k: int, cache: Path, fraction: float = 0.5):
    if cache.exists():
        data = np.load(cache)
        if len(data["masks"]) >= k:
            return data["masks"][:k].astype(float), data["losses"][:k]
    n = len(train)
    rng = np.random.RandomState(123)
    masks, losses = np.zeros((k, n), bool), []
    for i in range(k):
        idx = rng.choice(n, n // 2 if fraction == 0.5 else max(2, round(fraction * n)), replace=False)
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
    """Mean per-query Spearman and top-10 overlap of `scores` against the reference `ref`."""
    comparison = compare(ref, scores, k=10)
    return comparison.mean_spearman, comparison.mean_topk_overlap


@dataclass
class LDSSetup:
    """A task's data, Task and trainer, and its retrains on random halves (cached in `out`)."""

    name: str
    out: Path
    train: TensorDataset
    query: TensorDataset
    fit: Callable[[TensorDataset, int], torch.nn.Module]
    task: Any
    masks: np.ndarray
    losses: np.ndarray

    @classmethod
    def load(cls, name: str, retrains: int, cache: str, fraction: float = 0.5) -> LDSSetup:
        """`retrains` models retrained on random subsets of `fraction` of the training set (cached in `cache`)."""
        out = Path(cache)
        out.mkdir(parents=True, exist_ok=True)
        train, query, fit, query_losses, task = task_setup(name)
        stem = f"{name}{CACHE_TAGS.get(name, '')}_retrains"
        stem += "" if fraction == 0.5 else f"_f{fraction:g}"
        masks, losses = retrain_losses(train, fit, query_losses, retrains, out / f"{stem}.npz", fraction)
        return cls(name, out, train, query, fit, task, masks, losses)

    @classmethod
    def both_fractions(cls, args: argparse.Namespace) -> List[LDSSetup]:
        """The setups at retrain fractions 0.5 and 0.1 of `lds_runs_parser`'s arguments."""
        return [cls.load(args.task, args.retrains, args.cache, fraction) for fraction in (0.5, 0.1)]

    def lds(self, scores: np.ndarray) -> float:
        return lds(scores, self.masks, self.losses)

    def score(
        self, analyzer: Analyzer, name: str, strategy: str = "ekfac", bif_args: Optional[BIFArguments] = None
    ) -> Tuple[np.ndarray, float]:
        """Pairwise scores of every query against every train example with `strategy`, and the fit + score time."""
        return score_pairwise(analyzer, name, strategy, self.train, self.query, bif_args)


def lds_runs_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that scores runs of the package by LDS at both retrain fractions: --task,
    --retrains, --seeds, --overrides (BIFArguments fields for every run) and --cache."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--overrides", default="{}", help="JSON dict of BIFArguments fields for every run")
    parser.add_argument("--cache", default="./benchmark_results")
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["uci", "digits"], default="uci")
    parser.add_argument("--retrains", type=int, default=60)
    parser.add_argument(
        "--grid",
        default='[{}, {"sampler": "sgld", "step_size": 1e-4, "nbeta": 100}]',
        help="JSON list of BIFArguments overrides; {} is the defaults",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5], help="retrain fractions of the LDS")
    parser.add_argument("--cache", default="./benchmark_results")
    args = parser.parse_args()
    set_threads(1)
    setups = [LDSSetup.load(args.task, args.retrains, args.cache, f) for f in args.fractions]
    setup = setups[0]

    def lds_columns(scores: np.ndarray) -> dict:
        if len(setups) == 1:
            return {"lds": setup.lds(scores)}
        return {f"lds_f{f:g}": s.lds(scores) for f, s in zip(args.fractions, setups)}

    model = prepare_model(setup.fit(setup.train, 0), setup.task)
    analyzer = Analyzer(args.task, model, setup.task, cpu=True, output_dir=str(setup.out), disable_tqdm=True)
    print(
        f"{args.task}: {len(setup.train)} train, {len(setup.query)} query, {len(setup.masks)} retrains, "
        f"torch {torch.__version__}",
        flush=True,
    )
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    ekfac, seconds = setup.score(analyzer, "ekfac")
    add({"setting": "EK-FAC", "seconds": seconds, **lds_columns(ekfac)})
    ident, _ = setup.score(analyzer, "identity", "identity")
    add({"setting": "identity", **lds_columns(ident), "spearman_vs_ekfac": agreement(ekfac, ident)[0]})
    for i, overrides in enumerate(json.loads(args.grid)):
        try:
            scores, seconds = setup.score(analyzer, f"bif{i}", "bif", BIFArguments(**overrides))
        except Exception as exc:  # noqa: BLE001 - a diverging setting is a result of the grid, not a crash
            add({"setting": overrides or "defaults", "error": str(exc).splitlines()[0][:160]})
            continue
        rho, top = agreement(ekfac, scores)
        row = {"setting": overrides or "defaults", "seconds": seconds, **lds_columns(scores)}
        add({**row, "spearman_vs_ekfac": rho, "top10_overlap": top})
    (setup.out / f"{args.task}_grid.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
