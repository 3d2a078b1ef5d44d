"""A/B agreement of two influence score sets (e.g. EK-FAC vs BIF, or a run vs its previous version).

Inputs are kronfluence score folders (`scores_<name>/`), single `.safetensors` score files, the dictionaries
returned by `Analyzer.load_pairwise_scores`, or plain tensors/arrays. Per query (row of `[n_query, n_train]`)
the comparison reports Spearman and Pearson correlations, top-k overlaps and sign agreement, then summarizes
them over queries. Everything is vectorized over rows; ranks follow `scipy.stats.rankdata` (average ties).

Sign convention (kronfluence's): a positive score means the training example helps the query (upweighting it
lowers a loss-like measurement), a negative score means it harms it. So "top-k most helpful" are the k largest
scores and "top-k most harmful" the k most negative ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kronfluence_bif import storage
from kronfluence_bif.logs import logger
from kronfluence_bif.storage import ScoreKind, jsonable  # noqa: F401 - also importable from here, as before

ScoresLike = Union[str, "os.PathLike[str]", torch.Tensor, np.ndarray, Mapping[str, torch.Tensor], "ScoreSet"]

# Dataset metadata written by kronfluence (and by kronfluence-bif's scoring) beside every score file.
DATASET_METADATA_FILES = storage.DATASET_METADATA_FILES
SCORE_KINDS = tuple(ScoreKind)

# Per-query metrics of a Comparison, in table order, with their table labels ({k} is filled in).
METRICS: Tuple[Tuple[str, str], ...] = (
    ("spearman", "Spearman"),
    ("pearson", "Pearson"),
    ("topk_overlap", "top-{k} overlap, most helpful (largest scores)"),
    ("bottomk_overlap", "top-{k} overlap, most harmful (most negative)"),
    ("sign_agreement", "sign agreement, all train examples"),
    ("topk_sign_agreement", "sign agreement, top-{k} of A by |score|"),
)

# Rows per vectorized block: bounds the temporary [rows, n_train] arrays to a few tens of MB.
_BLOCK_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class ScoreSet:
    """One side of a comparison: float64 scores and where they came from.

    `pairwise` is `[n_query, n_train]` (per-token `[n_query, n_train, T]` scores are summed over T, which gives
    kronfluence's sequence scores), `self_scores` is `[n_train]`. `dataset_metadata` holds the parsed
    `query_dataset_metadata.json` / `train_dataset_metadata.json` under the keys "query" / "train" when present.
    """

    label: str
    pairwise: Optional[np.ndarray] = None
    self_scores: Optional[np.ndarray] = None
    dataset_metadata: Dict[str, Any] = field(default_factory=dict)
    folder: Optional[Path] = None

    @property
    def kinds(self) -> List[str]:
        return [
            k for k, v in ((ScoreKind.PAIRWISE, self.pairwise), (ScoreKind.SELF, self.self_scores)) if v is not None
        ]


def _tensor_to_array(value: Any, label: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: cannot convert {type(value).__name__} to a float array ({exc}).") from exc


def _from_mapping(tensors: Mapping[str, Any], label: str) -> np.ndarray:
    """`all_modules`, or the sum of kronfluence's per-module tensors when that key is absent."""
    if not tensors:
        raise ValueError(f"{label}: the score dictionary is empty; expected the key `{storage.ALL_MODULES}`.")
    if storage.ALL_MODULES in tensors:
        return _tensor_to_array(tensors[storage.ALL_MODULES], label)
    arrays = [_tensor_to_array(v, label) for v in tensors.values()]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"{label}: no `{storage.ALL_MODULES}` key and the per-module tensors have different shapes "
            f"{sorted(shapes)}; pass a kronfluence score file or the `all_modules` tensor."
        )
    logger.info("%s: no `%s` key; summing %d per-module tensors.", label, storage.ALL_MODULES, len(arrays))
    return np.sum(arrays, axis=0)


def _assign(scores: ScoreSet, array: np.ndarray, label: str) -> ScoreSet:
    if array.ndim == 1:
        scores.self_scores = array
    elif array.ndim == 2:
        scores.pairwise = array
    elif array.ndim == 3:
        logger.info("%s: per-token scores %s summed over tokens into sequence scores.", label, list(array.shape))
        scores.pairwise = array.sum(axis=2)
    else:
        raise ValueError(
            f"{label}: scores of shape {list(array.shape)} are not kronfluence scores; expected [n_train] (self), "
            "[n_query, n_train] (pairwise) or [n_query, n_train, T] (per-token)."
        )
    return scores


def _read_dataset_metadata(folder: Path) -> Dict[str, Any]:
    found = {}
    for side, name in DATASET_METADATA_FILES.items():
        path = folder / name
        if path.exists():
            found[side] = storage.load_json(path)
    return found


def _load_folder(folder: Path, label: str) -> ScoreSet:
    scores = ScoreSet(label=label, folder=folder, dataset_metadata=_read_dataset_metadata(folder))
    for kind in SCORE_KINDS:
        path = storage.score_file(folder, kind)
        if path.exists():
            array = _from_mapping(storage.load_tensors(path), f"{label} ({path.name})")
            if (kind == ScoreKind.SELF) != (array.ndim == 1):
                raise ValueError(f"{label}: `{path}` holds a tensor of shape {list(array.shape)}, not {kind} scores.")
            _assign(scores, array, label)
    if scores.kinds:
        return scores
    hints = []
    if any(storage.score_file(folder, kind, (0, 0)).exists() for kind in SCORE_KINDS):
        hints.append("it holds only partition files: compute the remaining data partitions so they are aggregated")
    subfolders = sorted(p.name for p in folder.glob(storage.SCORE_PREFIX + "*") if p.is_dir())
    if subfolders:
        hints.append(f"it looks like an analysis folder; pass one of its score folders: {', '.join(subfolders)}")
    names = " or ".join(storage.score_file(Path(), kind).name for kind in SCORE_KINDS)
    hint = ("; " + "; ".join(hints)) if hints else ""
    raise ValueError(f"{label}: folder `{folder}` holds no {names}{hint}.")


def _load_file(path: Path, label: str) -> ScoreSet:
    if path.suffix != ".safetensors":
        raise ValueError(f"{label}: `{path}` is not a .safetensors file; pass a scores folder or a score file.")
    scores = _assign(ScoreSet(label=label), _from_mapping(storage.load_tensors(path), label), label)
    parent = path.parent
    if any(path == storage.score_file(parent, kind) for kind in SCORE_KINDS):
        scores.dataset_metadata = _read_dataset_metadata(parent)
        scores.folder = parent
    return scores


def load_scores(source: ScoresLike, label: Optional[str] = None) -> ScoreSet:
    """Read scores from a `scores_<name>` folder, a `.safetensors` file, a dict of tensors, or a tensor/array."""
    if isinstance(source, ScoreSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        label = label or str(source)
        if path.is_dir():
            return _load_folder(path, label)
        if path.is_file():
            return _load_file(path, label)
        raise ValueError(f"{label}: no such file or folder `{path}`; pass a `scores_<name>` folder or a score file.")
    if isinstance(source, Mapping):
        label = label or "scores dict"
        return _assign(ScoreSet(label=label), _from_mapping(source, label), label)
    array = _tensor_to_array(source, label or "scores")
    return _assign(ScoreSet(label=label or f"tensor {list(array.shape)}"), array, label or "scores")


# ---------------------------------------------------------------------------------------------- row metrics
def _as_rows(x: Any) -> np.ndarray:
    array = _tensor_to_array(x, "scores")
    if array.ndim == 1:
        return array[None, :]
    if array.ndim != 2:
        raise ValueError(f"Expected a [rows, columns] array, got shape {list(array.shape)}.")
    return array


def rank_rows(x: Any) -> np.ndarray:
    """1-based ranks along dim 1 with ties averaged (`scipy.stats.rankdata(x, axis=1)`), all rows at once."""
    x = _as_rows(x)
    m, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    starts = np.ones((m, n), dtype=bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    ends = np.ones((m, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    positions = np.broadcast_to(np.arange(n), (m, n))
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, positions, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((m, n), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def _constant_rows(x: np.ndarray) -> np.ndarray:
    return (x == x[:, :1]).all(axis=1)


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x).all(axis=1)


def _pearson_centered(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # nan rows are masked by the callers
        ac = a - a.mean(axis=1, keepdims=True)
        bc = b - b.mean(axis=1, keepdims=True)
        r = (ac * bc).sum(axis=1) / np.sqrt((ac * ac).sum(axis=1) * (bc * bc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def pearson_rows(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b`; nan for constant or non-finite rows."""
    a, b = _as_rows(a), _as_rows(b)
    _check_same_shape(a, b)
    r = _pearson_centered(a, b)
    r[_constant_rows(a) | _constant_rows(b) | _nonfinite_rows(a) | _nonfinite_rows(b)] = np.nan
    return r


def spearman_rows(a: Any, b: Any) -> np.ndarray:
    """Spearman correlation per row (Pearson of average-tie ranks, as scipy); nan for constant or non-finite rows."""
    a, b = _as_rows(a), _as_rows(b)
    _check_same_shape(a, b)
    r = _pearson_centered(rank_rows(a), rank_rows(b))
    r[_constant_rows(a) | _constant_rows(b) | _nonfinite_rows(a) | _nonfinite_rows(b)] = np.nan
    return r


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Shapes differ: {list(a.shape)} and {list(b.shape)}.")


def _overlap(idx_a: np.ndarray, idx_b: np.ndarray, n: int) -> np.ndarray:
    member = np.zeros((idx_a.shape[0], n), dtype=bool)
    np.put_along_axis(member, idx_a, True, axis=1)
    return np.take_along_axis(member, idx_b, axis=1).sum(axis=1) / idx_a.shape[1]


def _block_metrics(a: np.ndarray, b: np.ndarray, k: int) -> Dict[str, np.ndarray]:
    """Every per-row metric of one block of rows; ties at the k-th place go to the lower train index.

    A constant row has no ranking: its correlations and top-k overlaps are nan. A row with NaN/inf: all nan.
    """
    n = a.shape[1]
    top_a, top_b = np.argsort(-a, axis=1, kind="stable")[:, :k], np.argsort(-b, axis=1, kind="stable")[:, :k]
    low_a, low_b = np.argsort(a, axis=1, kind="stable")[:, :k], np.argsort(b, axis=1, kind="stable")[:, :k]
    same_sign = np.sign(a) == np.sign(b)
    strongest_a = np.argsort(-np.abs(a), axis=1, kind="stable")[:, :k]
    undefined = _constant_rows(a) | _constant_rows(b)
    nonfinite = _nonfinite_rows(a) | _nonfinite_rows(b)
    out = {
        "spearman": _pearson_centered(rank_rows(a), rank_rows(b)),
        "pearson": _pearson_centered(a, b),
        "topk_overlap": _overlap(top_a, top_b, n),
        "bottomk_overlap": _overlap(low_a, low_b, n),
        "sign_agreement": same_sign.mean(axis=1),
        "topk_sign_agreement": np.take_along_axis(same_sign, strongest_a, axis=1).mean(axis=1),
    }
    for name in ("spearman", "pearson", "topk_overlap", "bottomk_overlap"):  # constant row: ranking undefined
        out[name][undefined] = np.nan
    for values in out.values():
        values[nonfinite] = np.nan
    return out


def row_metrics(a: np.ndarray, b: np.ndarray, k: int) -> Dict[str, np.ndarray]:
    """Per-row metrics of two `[rows, n]` float arrays, vectorized over blocks of rows (bounded memory)."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, a.shape[1]))
    blocks = [_block_metrics(a[i : i + rows], b[i : i + rows], k) for i in range(0, a.shape[0], rows)]
    return {name: np.concatenate([blk[name] for blk in blocks]) for name, _ in METRICS}


# ---------------------------------------------------------------------------------------------- result
def _stats(values: np.ndarray) -> Dict[str, Any]:
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return {"mean": math.nan, "median": math.nan, "min": math.nan, "n_excluded": int(values.size)}
    return {
        "mean": float(valid.mean()),
        "median": float(np.median(valid)),
        "min": float(valid.min()),
        "n_excluded": int(values.size - valid.size),
    }


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


def _short_list(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


@dataclass
class Comparison:
    """Agreement of scores A and B: per-query arrays and their summaries.

    `spearman`, `pearson`: per-query correlations over training examples. `topk_overlap` / `bottomk_overlap`:
    fraction of the k largest (most helpful) / most negative (most harmful) training examples of A that are also
    among B's. `sign_agreement`: fraction of training examples with the same sign (zero is its own sign);
    `topk_sign_agreement`: the same on A's k largest |scores|. `self_spearman` / `self_pearson`: agreement of the
    self-influence vectors when both inputs hold self scores. For self scores (`kind == "self"`) the arrays have
    one entry, the self-influence vector, and `n_query` is None.

    A query whose scores are constant (in A or B) has no ranking, so its correlations and top-k overlaps are nan;
    a row with NaN/inf is nan everywhere. nan entries are excluded from the summaries and counted in `n_excluded`.
    """

    label_a: str
    label_b: str
    kind: str
    n_query: Optional[int]
    n_train: int
    k: int
    spearman: np.ndarray
    pearson: np.ndarray
    topk_overlap: np.ndarray
    bottomk_overlap: np.ndarray
    sign_agreement: np.ndarray
    topk_sign_agreement: np.ndarray
    self_spearman: Optional[float] = None
    self_pearson: Optional[float] = None
    constant_in_a: List[int] = field(default_factory=list)
    constant_in_b: List[int] = field(default_factory=list)
    non_finite: List[int] = field(default_factory=list)

    @property
    def summary(self) -> Dict[str, Dict[str, Any]]:
        """{metric: {"mean", "median", "min", "n_excluded"}} over queries, nan rows excluded."""
        return {name: _stats(getattr(self, name)) for name, _ in METRICS}

    @property
    def mean_spearman(self) -> float:
        return self.summary["spearman"]["mean"]

    @property
    def mean_topk_overlap(self) -> float:
        return self.summary["topk_overlap"]["mean"]

    def failures(self, min_spearman: Optional[float] = None, min_topk_overlap: Optional[float] = None) -> List[str]:
        """Readable reasons why the mean Spearman / mean top-k overlap is below its threshold (empty: passed)."""
        for arg, threshold, low in (("min_spearman", min_spearman, -1.0), ("min_topk_overlap", min_topk_overlap, 0.0)):
            if threshold is not None and (
                isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not low <= threshold <= 1.0
            ):
                raise ValueError(f"`{arg}` must be a number in [{low:g}, 1] or None, got {threshold!r}.")
        reasons = []
        for name, value, threshold in (
            ("mean Spearman", self.mean_spearman, min_spearman),
            (f"mean top-{self.k} overlap", self.mean_topk_overlap, min_topk_overlap),
        ):
            if threshold is None:
                continue
            if math.isnan(value):
                reasons.append(f"{name} is undefined (every query excluded), threshold {threshold}")
            elif value < threshold:
                reasons.append(f"{name} {value:.4f} is below the threshold {threshold}")
        return reasons

    def to_dict(self, per_query: bool = True) -> Dict[str, Any]:
        """JSON-ready summary (NaN written as null); `per_query=False` drops the per-query arrays."""
        out: Dict[str, Any] = {
            "a": self.label_a,
            "b": self.label_b,
            "kind": self.kind,
            "n_query": self.n_query,
            "n_train": self.n_train,
            "k": self.k,
            "summary": self.summary,
            "self_influence": None
            if self.self_spearman is None
            else {"spearman": self.self_spearman, "pearson": self.self_pearson},
            "excluded": {
                "constant_in_a": self.constant_in_a,
                "constant_in_b": self.constant_in_b,
                "non_finite": self.non_finite,
            },
        }
        if per_query:
            out["per_query"] = {name: getattr(self, name) for name, _ in METRICS}
        return jsonable(out)

    def to_table(self) -> str:
        """Human-readable report: one line per metric with mean / median / min over queries."""
        lines = [f"A: {self.label_a}", f"B: {self.label_b}"]
        if self.kind == ScoreKind.SELF:
            lines.append(f"self-influence scores: {self.n_train} training examples; k = {self.k}")
            lines.append("")
            lines.append(f"{'metric':<48}{'value':>10}")
            for name, title in METRICS:
                lines.append(f"{title.format(k=self.k):<48}{_fmt(float(getattr(self, name)[0])):>10}")
        else:
            lines.append(
                f"pairwise scores: {self.n_query} queries x {self.n_train} training examples; k = {self.k} "
                "(kronfluence sign: positive = helpful)"
            )
            lines.append("")
            lines.append(f"{'metric (per query)':<48}{'mean':>10}{'median':>10}{'min':>10}{'excluded':>10}")
            summary = self.summary
            for name, title in METRICS:
                s = summary[name]
                lines.append(
                    f"{title.format(k=self.k):<48}{_fmt(s['mean']):>10}{_fmt(s['median']):>10}{_fmt(s['min']):>10}"
                    f"{s['n_excluded']:>10}"
                )
            if self.self_spearman is not None:
                lines.append("")
                lines.append(
                    f"self-influence: Spearman {_fmt(self.self_spearman)}, Pearson {_fmt(self.self_pearson)} "
                    f"over {self.n_train} training examples"
                )
        notes = []
        if self.constant_in_a:
            notes.append(
                f"constant scores in A (no ranking: correlations, overlaps): {_short_list(self.constant_in_a)}"
            )
        if self.constant_in_b:
            notes.append(
                f"constant scores in B (no ranking: correlations, overlaps): {_short_list(self.constant_in_b)}"
            )
        if self.non_finite:
            notes.append(f"NaN/inf scores (every metric): {_short_list(self.non_finite)}")
        if notes:
            lines.append("")
            lines.append("Rows excluded from mean/median/min:")
            lines.extend(f"  {note}" for note in notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


# ---------------------------------------------------------------------------------------------- compare
def _check_metadata(a: ScoreSet, b: ScoreSet) -> None:
    for side, name in DATASET_METADATA_FILES.items():
        if side in a.dataset_metadata and side in b.dataset_metadata:
            va, vb = a.dataset_metadata[side], b.dataset_metadata[side]
            if va != vb:
                raise ValueError(
                    f"The {side} datasets differ ({name}): A `{a.label}` has {va}, B `{b.label}` has {vb}. "
                    f"Compare scores computed on the same {side} dataset and {side}_indices."
                )


def _pick_kind(a: ScoreSet, b: ScoreSet) -> str:
    for kind in SCORE_KINDS:
        if kind in a.kinds and kind in b.kinds:
            return kind
    raise ValueError(
        f"Nothing to compare: A `{a.label}` holds {' and '.join(a.kinds)} scores, B `{b.label}` holds "
        f"{' and '.join(b.kinds)} scores. Pass two pairwise or two self score sets."
    )


def _score_rows(a: ScoreSet, b: ScoreSet, kind: str) -> Tuple[np.ndarray, np.ndarray]:
    """The compared arrays as rows (self scores become one row); raises when their shapes differ."""
    xa, xb = (a.pairwise, b.pairwise) if kind == ScoreKind.PAIRWISE else (a.self_scores[None], b.self_scores[None])
    if xa.shape != xb.shape:
        what = "[n_query, n_train]" if kind == ScoreKind.PAIRWISE else "[n_train]"
        shape_a, shape_b = (
            (list(xa.shape), list(xb.shape)) if kind == ScoreKind.PAIRWISE else ([xa.shape[1]], [xb.shape[1]])
        )
        raise ValueError(
            f"The {kind} score shapes differ: A `{a.label}` is {shape_a}, B `{b.label}` is {shape_b} ({what}). "
            "Compare scores of the same queries and training examples."
        )
    return xa, xb


def compare(
    a: ScoresLike,
    b: ScoresLike,
    k: int = 10,
    label_a: Optional[str] = None,
    label_b: Optional[str] = None,
) -> Comparison:
    """Compare score sets A and B of the same shape and datasets; see `Comparison` for the metrics.

    Pairwise scores are compared when both sides hold them, otherwise self scores (a 1-D tensor is a self-score
    vector). When both sides also hold self scores, their Spearman/Pearson are reported too. `k` above the
    number of training examples is lowered to it, with a warning.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be a positive integer (the size of the top-k sets), got {k!r}.")
    sa = load_scores(a, label_a or (None if isinstance(a, (str, os.PathLike)) else "A"))
    sb = load_scores(b, label_b or (None if isinstance(b, (str, os.PathLike)) else "B"))
    _check_metadata(sa, sb)
    kind = _pick_kind(sa, sb)
    xa, xb = _score_rows(sa, sb, kind)
    n_query, n_train = xa.shape
    if n_train == 0 or n_query == 0:
        raise ValueError(f"The {kind} scores are empty (shape {list(xa.shape)}); nothing to compare.")
    if k > n_train:
        logger.warning(
            "k=%d exceeds the %d training examples; using k=%d (top-k overlap is then 1).", k, n_train, n_train
        )
        k = n_train
    metrics = row_metrics(xa, xb, int(k))
    nonfinite = _nonfinite_rows(xa) | _nonfinite_rows(xb)
    if nonfinite.any():
        logger.warning("%d rows hold NaN or inf scores; they are excluded from every metric.", int(nonfinite.sum()))
    result = Comparison(
        label_a=sa.label,
        label_b=sb.label,
        kind=kind,
        n_query=n_query if kind == ScoreKind.PAIRWISE else None,
        n_train=n_train,
        k=int(k),
        constant_in_a=np.flatnonzero(_constant_rows(xa) & ~nonfinite).tolist(),
        constant_in_b=np.flatnonzero(_constant_rows(xb) & ~nonfinite).tolist(),
        non_finite=np.flatnonzero(nonfinite).tolist(),
        **metrics,
    )
    if kind == ScoreKind.SELF:
        result.self_spearman, result.self_pearson = float(metrics["spearman"][0]), float(metrics["pearson"][0])
    elif sa.self_scores is not None and sb.self_scores is not None:
        if sa.self_scores.shape != sb.self_scores.shape:
            raise ValueError(
                f"The self score shapes differ: A `{sa.label}` is {list(sa.self_scores.shape)}, "
                f"B `{sb.label}` is {list(sb.self_scores.shape)}."
            )
        result.self_spearman = float(spearman_rows(sa.self_scores, sb.self_scores)[0])
        result.self_pearson = float(pearson_rows(sa.self_scores, sb.self_scores)[0])
    return result
