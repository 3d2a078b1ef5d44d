"""Linear datamodeling score (LDS): how well scores predict the effect of retraining on random subsets.

Retrain the model on random subsets S_1..S_K of the training set and measure each query (e.g. its loss) on every
retrained model. Scores predict that measurement linearly; LDS of a query is the Spearman correlation, over the K
subsets, between prediction and measurement, and the reported LDS is its mean over queries (Park et al. 2023,
TRAK). The BIF paper's App. C.1 writes the transposed variant (Spearman over queries within each subset, averaged
over subsets); this module implements the per-query form, as README's defaults table and benchmarks do.

Sign (kronfluence's): a positive score means the training example lowers the query's loss-like measurement, so
the prediction for subset S is `-sum_{i in S} score[q, i]`, i.e. `prediction = -masks @ scores.T`. For a
measurement where higher is better (accuracy, margin), pass its negative.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from kronfluence.arguments import FactorArguments
from tqdm.auto import tqdm

from kronfluence_bif import storage
from kronfluence_bif.compare import ScoresLike, load_scores, spearman_rows
from kronfluence_bif.logs import logger
from kronfluence_bif.storage import jsonable

_CACHE_FORMAT = "kronfluence_bif.lds.retrain_subsets/1"


@dataclass
class LDSResult:
    """Per-query LDS (nan for a query whose prediction or measurement is constant over subsets) and its mean."""

    per_query: np.ndarray
    mean: float
    n_subsets: int
    n_excluded: int

    def to_dict(self) -> Dict[str, Any]:
        return jsonable(
            {
                "mean": self.mean,
                "n_subsets": self.n_subsets,
                "n_excluded": self.n_excluded,
                "per_query": self.per_query,
            }
        )

    def __str__(self) -> str:
        n_used = self.per_query.size - self.n_excluded
        text = f"LDS {self.mean:.4f} (mean over {n_used} queries, {self.n_subsets} subsets)"
        if self.n_excluded:
            text += f"; {self.n_excluded} queries excluded (constant prediction or measurement)"
        return text


def _masks_array(masks: Any) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"`masks` must be [n_subsets, n_train], got shape {list(masks.shape)}.")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError("`masks` must be boolean or 0/1 (1 = the training example was in the subset).")
    return masks.astype(np.float64)


def predict_subset_measurements(scores: ScoresLike, masks: Any) -> np.ndarray:
    """Linear prediction `-masks @ scores.T` (kronfluence sign), shape [n_subsets, n_query]."""
    loaded = load_scores(scores, "scores")
    if loaded.pairwise is None:
        raise ValueError("`scores` must be pairwise scores [n_query, n_train]; self scores cannot predict queries.")
    m = _masks_array(masks)
    if m.shape[1] != loaded.pairwise.shape[1]:
        raise ValueError(
            f"`masks` has {m.shape[1]} columns but `scores` has {loaded.pairwise.shape[1]} training examples; "
            "the masks must index the same training set, in the same order, as the score columns."
        )
    return -(m @ loaded.pairwise.T)


def linear_datamodeling_score(scores: ScoresLike, masks: Any, measurements: Any) -> LDSResult:
    """LDS per query: Spearman over subsets between `-masks @ scores.T` and the measured `measurements`.

    scores: [n_query, n_train] (a scores folder, file or tensor); masks: [n_subsets, n_train] bool or 0/1;
    measurements: [n_subsets, n_query], the query measurements of the model retrained on each subset.
    """
    prediction = predict_subset_measurements(scores, masks)
    actual = measurements.detach().cpu().double().numpy() if isinstance(measurements, torch.Tensor) else measurements
    actual = np.asarray(actual, dtype=np.float64)
    if actual.shape != prediction.shape:
        raise ValueError(
            f"`measurements` must be [n_subsets, n_query] = {list(prediction.shape)} to match `masks` and `scores`, "
            f"got {list(actual.shape)}."
        )
    if actual.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets (got {actual.shape[0]}); retrain on more subsets.")
    per_query = spearman_rows(prediction.T, actual.T)
    valid = per_query[~np.isnan(per_query)]
    mean = float(valid.mean()) if valid.size else math.nan
    return LDSResult(per_query=per_query, mean=mean, n_subsets=actual.shape[0], n_excluded=per_query.size - valid.size)


# ---------------------------------------------------------------------------------------------- retraining
class SubsetRetrains(NamedTuple):
    """Subset masks [n_subsets, n_train] (bool) and measurements [n_subsets, n_query] (float64)."""

    masks: np.ndarray
    measurements: np.ndarray


def draw_subset_masks(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random subsets of `round(fraction * n_train)` training examples; subset i depends only on (seed, i)."""
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for i in range(n_subsets):
        chosen = np.random.default_rng([seed, i]).choice(n_train, size=size, replace=False)
        masks[i, chosen] = True
    return masks


def _validate(n_train: int, n_subsets: int, fraction: float, seed: int) -> None:
    for name, value, low in (("n_train", n_train, 2), ("n_subsets", n_subsets, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1) (the share of training examples kept), got {fraction!r}.")
    size = int(round(fraction * n_train))
    if not 1 <= size < n_train:
        raise ValueError(
            f"`fraction`={fraction} keeps {size} of n_train={n_train} examples; every subset must keep at least one "
            "and leave out at least one. Choose a fraction closer to 0.5."
        )


def _settings(n_train: int, n_subsets: int, fraction: float, seed: int) -> Dict[str, str]:
    return {
        "format": _CACHE_FORMAT,
        "n_train": str(int(n_train)),
        "n_subsets": str(int(n_subsets)),
        "fraction": repr(float(fraction)),
        "seed": str(int(seed)),
    }


def _read_cache(path: Path, settings: Dict[str, str]) -> Optional[np.ndarray]:
    """Measurements done so far, or None when there is no cache; raise when it was made with other settings."""
    if not path.exists():
        return None
    saved = storage.load_metadata(path)
    if saved.get("format") != _CACHE_FORMAT:
        raise ValueError(f"`cache_path` `{path}` is not a retrain_subsets cache; pass another path.")
    different = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: cache {old}, now {new}" for k, (old, new) in different.items())
        raise ValueError(
            f"`cache_path` `{path}` was made with other settings ({detail}). Pass the same n_train, n_subsets, "
            "fraction and seed to resume, or another cache_path (or delete the file) to start over."
        )
    return storage.load_tensors(path)["measurements"].double().numpy()


def _as_measurement(value: Any, index: int, n_query: Optional[int]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim > 1:
        raise ValueError(f"`train_fn` must return a 1-D array [n_query]; subset {index} gave {list(array.shape)}.")
    array = array.reshape(-1)
    if n_query is not None and array.size != n_query:
        raise ValueError(
            f"`train_fn` returned {array.size} measurements for subset {index}, but earlier subsets had {n_query}; "
            "it must measure the same queries every time."
        )
    if not np.isfinite(array).all():
        raise ValueError(
            f"`train_fn` returned NaN/inf measurements for subset {index} (did the retraining diverge?); "
            "fix the training and rerun: finished subsets are kept in cache_path."
        )
    return array


def retrain_subsets(
    train_fn: Callable[[np.ndarray], Any],
    n_train: int,
    n_subsets: int,
    fraction: float = 0.5,
    seed: int = 0,
    cache_path: Optional[Union[str, Path]] = None,
    disable_tqdm: bool = False,
) -> SubsetRetrains:
    """Retrain on random subsets and collect the query measurements, for `linear_datamodeling_score`.

    `train_fn(indices)` receives the sorted int64 training indices of one subset, retrains on them and returns the
    measurements of the queries [n_query] (e.g. their losses). With `cache_path`, the results are written
    atomically (safetensors) after every retrain, and a rerun with the same (n_train, n_subsets, fraction, seed)
    continues where the previous one stopped; other settings raise `ValueError`.
    """
    if not callable(train_fn):
        raise ValueError("`train_fn` must be a callable `train_fn(indices) -> measurements [n_query]`.")
    _validate(n_train, n_subsets, fraction, seed)
    settings = _settings(n_train, n_subsets, fraction, seed)
    masks = draw_subset_masks(int(n_train), int(n_subsets), float(fraction), int(seed))
    path = None if cache_path is None else Path(cache_path).expanduser()
    cached = None if path is None else _read_cache(path, settings)
    done = [] if cached is None else list(cached)
    if done:
        logger.info("Resuming from `%s`: %d of %d retrains done.", path, len(done), n_subsets)
    n_query = done[0].size if done else None
    with tqdm(total=n_subsets, initial=len(done), desc="Retraining on subsets", disable=disable_tqdm) as bar:
        for i in range(len(done), n_subsets):
            measured = _as_measurement(train_fn(np.flatnonzero(masks[i]).astype(np.int64)), i, n_query)
            n_query = measured.size
            done.append(measured)
            if path is not None:
                tensors = {"masks": torch.from_numpy(masks), "measurements": torch.from_numpy(np.stack(done))}
                storage.save_tensors(path, tensors, metadata=settings)
            bar.update(1)
    return SubsetRetrains(masks=masks, measurements=np.stack(done))


# ---------------------------------------------------------------------------------------------- scoring
def score_pairwise(
    analyzer: Any,
    name: str,
    strategy: str,
    train_dataset: Any,
    query_dataset: Any,
    bif_args: Any = None,
) -> Tuple[np.ndarray, float]:
    """Fit factors `name` with `strategy`, score every query against every training example; (scores, seconds).

    The full float64 `[n_query, n_train]` matrix that `linear_datamodeling_score` and `compare` take, from a
    `kronfluence_bif.Analyzer` (or kronfluence's, for strategies other than "bif"), in one batch per dataset;
    `seconds` is the wall time of the fit and the scoring. `bif_args` are the BIFArguments of strategy "bif".
    """
    start = time.perf_counter()
    analyzer.fit_all_factors(
        name,
        dataset=train_dataset,
        per_device_batch_size=len(train_dataset),
        factor_args=FactorArguments(strategy=strategy),
        bif_args=bif_args,
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        name,
        name,
        query_dataset=query_dataset,
        train_dataset=train_dataset,
        per_device_query_batch_size=len(query_dataset),
        per_device_train_batch_size=len(train_dataset),
        overwrite_output_dir=True,
    )
    seconds = time.perf_counter() - start
    return analyzer.load_pairwise_scores(name)["all_modules"].double().numpy(), seconds
