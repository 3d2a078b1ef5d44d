"""One query's most helpful and most harmful training examples, from a score folder (`kronfluence-bif inspect`).

kronfluence's sign: a positive score means the training example lowers the query's loss-like measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from kronfluence_bif.compare import ScoreSet, load_scores
from kronfluence_bif.storage import ScoreKind
from kronfluence_bif.tables import text_table


def _entries(values: np.ndarray, columns: np.ndarray, train_indices: Optional[List[int]]) -> List[Dict[str, Any]]:
    return [
        {
            "rank": rank + 1,
            "train_index": int(train_indices[c]) if train_indices is not None else int(c),
            "column": int(c),
            "score": float(values[c]),
        }
        for rank, c in enumerate(columns)
    ]


def _train_indices(scores: ScoreSet) -> Optional[List[int]]:
    """Training dataset index of each score column, or None when the columns are not dataset rows."""
    train_indices = (scores.dataset_metadata.get("train") or {}).get("indices")
    n_columns = scores.pairwise.shape[1] if scores.pairwise is not None else scores.self_scores.size
    if train_indices is not None and len(train_indices) != n_columns:
        return None  # e.g. aggregated train gradients: columns are not dataset rows
    return train_indices


def _inspect_self(
    folder: Union[str, Path], values: np.ndarray, top: int, train_indices: Optional[List[int]]
) -> Dict[str, Any]:
    """The highest and lowest self-influence scores."""
    order = np.argsort(-values, kind="stable")
    return {
        "folder": str(folder),
        "kind": ScoreKind.SELF,
        "n_train": int(values.size),
        "top": top,
        "highest": _entries(values, order[:top], train_indices),
        "lowest": _entries(values, np.argsort(values, kind="stable")[:top], train_indices),
    }


def inspect_scores(folder: Union[str, Path], query: Optional[int] = None, top: int = 10) -> Dict[str, Any]:
    """Most helpful (largest positive) and most harmful (most negative) training examples of one query.

    kronfluence's sign: a positive score means the training example lowers the query's loss-like measurement.
    `train_index` is the training dataset index (through `train_indices` when the scores used them); `column`
    is the column of the score matrix. For a self-score folder, the highest and lowest self-influences.
    """
    scores = load_scores(folder)
    train_indices = _train_indices(scores)
    if scores.pairwise is None:
        if query is not None:
            raise ValueError(f"`{folder}` holds self scores, which have no query axis; drop --query.")
        return _inspect_self(folder, scores.self_scores, top, train_indices)
    n_query, n_train = scores.pairwise.shape
    query = 0 if query is None else query
    if not 0 <= query < n_query:
        raise ValueError(f"--query {query} is out of range: `{folder}` holds {n_query} queries (0..{n_query - 1}).")
    query_indices = (scores.dataset_metadata.get("query") or {}).get("indices")
    row = scores.pairwise[query]
    helpful = np.flatnonzero(row > 0)
    harmful = np.flatnonzero(row < 0)
    helpful = helpful[np.argsort(-row[helpful], kind="stable")][:top]
    harmful = harmful[np.argsort(row[harmful], kind="stable")][:top]
    return {
        "folder": str(folder),
        "kind": ScoreKind.PAIRWISE,
        "n_query": int(n_query),
        "n_train": int(n_train),
        "query": int(query),
        "query_dataset_index": int(query_indices[query]) if query_indices and len(query_indices) == n_query else query,
        "top": top,
        "helpful": _entries(row, helpful, train_indices),
        "harmful": _entries(row, harmful, train_indices),
    }


def _section(title: str, entries: List[Dict[str, Any]]) -> List[str]:
    """A blank line, the title, and a rank / train_index / score table (or `(none)`)."""
    if not entries:
        return ["", title, "  (none)"]
    rows = [(e["rank"], e["train_index"], e["score"]) for e in entries]
    return ["", title] + ["  " + line for line in text_table(("rank", "train_index", "score"), rows)]


def format_inspection(result: Dict[str, Any]) -> str:
    """Text form of `inspect_scores`."""
    if result["kind"] == ScoreKind.SELF:
        lines = [f"{result['folder']}: self-influence scores of {result['n_train']} training examples"]
        lines += _section(f"Highest {result['top']} self-influence scores:", result["highest"])
        lines += _section(f"Lowest {result['top']} self-influence scores:", result["lowest"])
        return "\n".join(lines)
    lines = [
        f"{result['folder']}: query {result['query']} (query dataset index {result['query_dataset_index']}) of "
        f"{result['n_query']} queries x {result['n_train']} training examples",
        "kronfluence sign: a positive score means the training example helps the query (lowers its loss).",
    ]
    lines += _section(f"Most helpful (largest positive scores, up to {result['top']}):", result["helpful"])
    lines += _section(f"Most harmful (most negative scores, up to {result['top']}):", result["harmful"])
    return "\n".join(lines)
