"""Analysis of score arrays: alignment to predicted tokens, top sequences and token pairs, their relations."""

from __future__ import annotations

import unicodedata
from typing import Dict, List, Sequence, Tuple

import numpy as np

from kronfluence_bif.demo.tiny_lm.corpus import CharTokenizer


def shift_to_targets(per_token: np.ndarray) -> np.ndarray:
    """Move kronfluence per-token scores from input position t to the predicted token t + 1 (last axis)."""
    out = np.zeros_like(per_token)
    out[..., 1:] = per_token[..., :-1]
    return out


def top_train_sequences(per_token: np.ndarray, query: int, k: int) -> np.ndarray:
    """Indices of the `k` training sequences with the largest summed score for `query` (most helpful first)."""
    sequence = per_token[query].sum(axis=-1) if per_token.ndim == 3 else per_token[query]
    return np.argsort(-sequence, kind="stable")[:k]


def top_token_pairs(
    token_scores: np.ndarray, query_valid: np.ndarray, train_valid: np.ndarray, k: int = 100
) -> List[Tuple[int, int, int, int, float]]:
    """The `k` largest entries (q, s, i, t, score) of a ``[Q, Tq, N, Tt]`` matrix over valid token pairs."""
    valid = query_valid[:, :, None, None] & train_valid[None, None, :, :]
    flat = np.where(valid, token_scores, -np.inf).ravel()
    k = min(k, int(valid.sum()))
    if k == 0:
        return []
    best = np.argpartition(-flat, k - 1)[:k]
    best = best[np.argsort(-flat[best], kind="stable")]
    return [(*map(int, np.unravel_index(i, token_scores.shape)), float(flat[i])) for i in best]


def _char_class(ch: str) -> str:
    if ch.isspace():
        return "space"
    if ch.isalpha():
        return "letter"
    if ch.isdigit():
        return "digit"
    return unicodedata.category(ch)[0] if ch else "pad"


def relation_matrices(tokenizer: CharTokenizer) -> Dict[str, np.ndarray]:
    """Boolean ``[V, V]`` relations between token ids: identical, same letter ignoring case, same character class."""
    chars = tokenizer.itos
    lower = np.array([c.lower() for c in chars], dtype=object)
    classes = np.array([_char_class(c) if len(c) == 1 else c for c in chars], dtype=object)
    return {
        "identical": np.eye(len(chars), dtype=bool),
        "same ignoring case": lower[:, None] == lower[None, :],
        "same class (letter/digit/space/punct.)": classes[:, None] == classes[None, :],
    }


def relation_rates(
    pairs: Sequence[Tuple[int, int, int, int, float]],
    query_ids: np.ndarray,
    train_ids: np.ndarray,
    query_valid: np.ndarray,
    train_valid: np.ndarray,
    relations: Dict[str, np.ndarray],
) -> Dict[str, Tuple[float, float]]:
    """For each relation: (fraction of `pairs` whose tokens are related, base rate over all valid token pairs)."""
    vocab = next(iter(relations.values())).shape[0]
    train_counts = np.bincount(train_ids[train_valid], minlength=vocab).astype(float)
    query_counts = np.bincount(query_ids[query_valid], minlength=vocab).astype(float)
    total = query_counts.sum() * train_counts.sum()
    out = {}
    for name, rel in relations.items():
        hits = [bool(rel[query_ids[q, s], train_ids[i, t]]) for q, s, i, t, _ in pairs]
        base = float(query_counts @ rel.astype(float) @ train_counts / total) if total else float("nan")
        out[name] = (float(np.mean(hits)) if hits else float("nan"), base)
    return out


def context_snippet(tokenizer: CharTokenizer, ids: np.ndarray, position: int, width: int = 6) -> str:
    """The characters around `position` with the token itself in brackets, e.g. ``obje[c]t fu``."""
    left = tokenizer.decode(ids[max(0, position - width) : position])
    right = tokenizer.decode(ids[position + 1 : position + 1 + width])
    token = tokenizer.itos[int(ids[position])]
    return (left + "[" + token + "]" + right).replace("\n", "↵")


def format_pairs(
    pairs: Sequence[Tuple[int, int, int, int, float]],
    tokenizer: CharTokenizer,
    query_ids: np.ndarray,
    train_ids: np.ndarray,
) -> List[str]:
    """One line per pair: query, query token in context, train sequence, train token in context, score."""
    lines = []
    for q, s, i, t, score in pairs:
        qa = context_snippet(tokenizer, query_ids[q], s)
        ta = context_snippet(tokenizer, train_ids[i], t)
        lines.append(f"q{q} {qa!r:>18} <- train #{i:<4d} {ta!r:>18}  {score:+.4g}")
    return lines


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def per_token_agreement(ekfac: np.ndarray, bif: np.ndarray, train_valid: np.ndarray) -> Dict[str, float]:
    """Mean per-query Spearman of sequence scores and of token scores (EK-FAC shifted to predicted tokens)."""
    seq = [_spearman(ekfac[q].sum(-1), bif[q].sum(-1)) for q in range(ekfac.shape[0])]
    shifted = shift_to_targets(ekfac)
    tok = [_spearman(shifted[q][train_valid], bif[q][train_valid]) for q in range(ekfac.shape[0])]
    raw = [_spearman(ekfac[q][train_valid], bif[q][train_valid]) for q in range(ekfac.shape[0])]
    return {
        "sequence": float(np.nanmean(seq)),
        "token_shifted": float(np.nanmean(tok)),
        "token_unshifted": float(np.nanmean(raw)),
    }
