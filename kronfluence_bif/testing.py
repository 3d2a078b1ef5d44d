"""pytest helpers for users' CI: score agreement thresholds, golden-file regression, and fake score folders.

    from kronfluence_bif.testing import assert_matches_golden, assert_scores_agree

    def test_bif_still_agrees_with_ekfac():
        assert_scores_agree("runs/uci/scores_ekfac", "runs/uci/scores_bif", min_spearman=0.05, min_topk_overlap=0.25)

    def test_scores_unchanged():
        assert_matches_golden("runs/uci/scores_bif", "tests/golden/uci_bif.safetensors", rtol=1e-4)

Golden files are (re)written when missing, with `update=True`, or with the environment variable
`KRONFLUENCE_BIF_UPDATE_GOLDEN=1`; review and commit them like any other test data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments

from kronfluence_bif import storage
from kronfluence_bif.compare import DATASET_METADATA_FILES, Comparison, ScoresLike, compare, load_scores
from kronfluence_bif.logs import logger
from kronfluence_bif.storage import ScoreKind

UPDATE_GOLDEN_ENV = "KRONFLUENCE_BIF_UPDATE_GOLDEN"
_GOLDEN_FORMAT = "kronfluence_bif.testing.golden/1"


def assert_scores_agree(
    a: ScoresLike,
    b: ScoresLike,
    min_spearman: Optional[float] = 0.9,
    min_topk_overlap: Optional[float] = None,
    k: int = 10,
) -> Comparison:
    """Fail (AssertionError) when the mean per-query Spearman or top-k overlap of A vs B is below its threshold.

    A threshold of None is not checked. Returns the `Comparison` for further checks. The default 0.9 suits
    regression checks of one method against itself; two methods (EK-FAC vs BIF) agree far less.
    """
    comparison = compare(a, b, k=k)
    reasons = comparison.failures(min_spearman=min_spearman, min_topk_overlap=min_topk_overlap)
    if reasons:
        call = f"assert_scores_agree(min_spearman={min_spearman}, min_topk_overlap={min_topk_overlap}, k={k})"
        raise AssertionError(
            f"{call} failed:\n" + "\n".join(f"  {r}" for r in reasons) + "\n\n" + comparison.to_table()
        )
    return comparison


def _update_requested() -> bool:
    return os.environ.get(UPDATE_GOLDEN_ENV, "").strip().lower() in ("1", "true", "yes")


def _main_array(scores: ScoresLike, label: str) -> np.ndarray:
    loaded = load_scores(scores, label)
    return loaded.pairwise if loaded.pairwise is not None else loaded.self_scores


def _describe_mismatch(actual: np.ndarray, golden: np.ndarray, bad: np.ndarray, rtol: float, atol: float) -> str:
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(actual - golden)
        diff[np.isnan(diff)] = np.inf  # NaN on one side only
        rel = diff / np.abs(golden)
    rel[golden == 0] = np.nan
    worst_abs = np.unravel_index(int(np.argmax(diff)), diff.shape)
    lines = [
        f"{int(bad.sum())} of {bad.size} values differ beyond rtol={rtol:g}, atol={atol:g}.",
        f"max abs diff {diff[worst_abs]:.6g} at index {tuple(int(i) for i in worst_abs)} "
        f"(actual {actual[worst_abs]:.8g}, golden {golden[worst_abs]:.8g})",
    ]
    if not np.isnan(rel).all():
        worst_rel = np.unravel_index(int(np.nanargmax(rel)), rel.shape)
        lines.append(
            f"max rel diff {rel[worst_rel]:.6g} at index {tuple(int(i) for i in worst_rel)} "
            f"(actual {actual[worst_rel]:.8g}, golden {golden[worst_rel]:.8g})"
        )
    first = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:5]]
    lines.append(f"first differing indices: {first}")
    return "\n".join(lines)


def assert_matches_golden(
    scores: ScoresLike,
    golden_path: Union[str, Path],
    rtol: float = 1e-5,
    atol: float = 1e-8,
    update: bool = False,
) -> bool:
    """Compare scores with a golden `.safetensors` file (float64, key `all_modules`), or (re)write it.

    Writes the file, and returns True, when it is missing, when `update=True` or when the environment variable
    KRONFLUENCE_BIF_UPDATE_GOLDEN=1; otherwise compares (`numpy.isclose`, NaN equal to NaN) and returns False,
    or raises AssertionError naming the shape or the largest absolute and relative differences and where.
    """
    path = Path(golden_path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"`golden_path` must end in .safetensors, got `{path}`.")
    actual = _main_array(scores, "scores")
    requested = update or _update_requested()
    if requested or not path.exists():
        reason = "update requested" if requested else "it did not exist"
        storage.save_tensors(path, {storage.ALL_MODULES: torch.from_numpy(actual)}, {"format": _GOLDEN_FORMAT})
        logger.warning("Wrote golden scores %s to `%s` (%s).", list(actual.shape), path, reason)
        return True
    golden = _main_array(path, str(path))
    hint = f"If the change is intended, rerun with {UPDATE_GOLDEN_ENV}=1 (or update=True) to rewrite `{path}`."
    if actual.shape != golden.shape:
        raise AssertionError(
            f"Scores of shape {list(actual.shape)} do not match the golden shape {list(golden.shape)} "
            f"in `{path}`.\n{hint}"
        )
    bad = ~np.isclose(actual, golden, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        raise AssertionError(
            f"Scores differ from the golden file `{path}`:\n{_describe_mismatch(actual, golden, bad, rtol, atol)}\n"
            f"{hint}"
        )
    return False


def write_score_folder(
    folder: Union[str, Path],
    scores: Any,
    query_dataset_metadata: Optional[Dict[str, Any]] = None,
    train_dataset_metadata: Optional[Dict[str, Any]] = None,
    score_args: Optional[ScoreArguments] = None,
    factor_args: Optional[FactorArguments] = None,
) -> Path:
    """Write a kronfluence-layout score folder without running anything (for tests of analysis code).

    `scores` [n_train] makes `self_scores.safetensors`, [n_query, n_train] (or [n_query, n_train, T]) makes
    `pairwise_scores.safetensors`, stored in `score_args.score_dtype` with kronfluence's header metadata, beside
    `score_arguments.json`, `factor_arguments.json` and the dataset metadata files (default: a TensorDataset of
    the matching size, `indices` null). Returns the folder.
    """
    folder = Path(folder).expanduser()
    score_args = score_args or ScoreArguments()
    factor_args = factor_args or FactorArguments()
    tensor = scores.detach().cpu() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    if tensor.ndim not in (1, 2, 3):
        raise ValueError(
            f"`scores` must be [n_train], [n_query, n_train] or [n_query, n_train, T], got {list(tensor.shape)}."
        )
    kind = ScoreKind.SELF if tensor.ndim == 1 else ScoreKind.PAIRWISE
    n_train = tensor.shape[0] if kind == ScoreKind.SELF else tensor.shape[1]
    metadata = {"train": train_dataset_metadata or {"type": "TensorDataset", "dataset_size": n_train, "indices": None}}
    if kind == ScoreKind.PAIRWISE:
        default_query = {"type": "TensorDataset", "dataset_size": tensor.shape[0], "indices": None}
        metadata["query"] = query_dataset_metadata or default_query
    dtype = score_args.score_dtype
    if not isinstance(dtype, torch.dtype):  # ScoreArguments rebuilt from JSON holds "torch.float32"
        dtype = getattr(torch, str(dtype).replace("torch.", ""))
    storage.save_tensors(
        storage.score_file(folder, kind), {storage.ALL_MODULES: tensor.to(dtype)}, score_args.to_str_dict()
    )
    storage.save_json(score_args.to_dict(), folder / storage.SCORE_ARGUMENTS_FILE)
    storage.save_json(factor_args.to_dict(), folder / storage.FACTOR_ARGUMENTS_FILE)
    for side, content in metadata.items():
        storage.save_json(content, folder / DATASET_METADATA_FILES[side])
    return folder
