"""Renders: token-by-token heatmaps (paper Fig. 2) and HTML pages of tokens coloured by influence (Fig. 16-19)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kronfluence_bif.demo.tiny_lm.analysis import top_train_sequences
from kronfluence_bif.demo.tiny_lm.corpus import CharTokenizer, display_token
from kronfluence_bif.tasks import IGNORE_INDEX


def plot_token_heatmaps(
    path: Path,
    token_scores: np.ndarray,
    query_ids: np.ndarray,
    query_valid: np.ndarray,
    train_ids: np.ndarray,
    train_shown: np.ndarray,
    tokenizer: CharTokenizer,
    train_indices: Sequence[int],
    title: str = "",
) -> Path:
    """PNG heatmaps of one query's token-by-token scores ``[Tq, N, Tt]`` against some training sequences.

    Rows are the query's scored (completion) tokens, columns the training sequence's tokens; red is positive
    (the training token helps the query token), blue negative, on one symmetric scale for all panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.flatnonzero(query_valid)
    panels = [(i, np.flatnonzero(train_shown[i])) for i in train_indices]
    values = [token_scores[np.ix_(rows, [i], cols)][:, 0, :] for i, cols in panels]
    vmax = max([float(np.abs(v).max()) for v in values if v.size] + [1e-12])
    width = max(4.0, 0.14 * max([len(c) for _, c in panels] + [1]) + 1.5)
    heights = [max(1.0, 0.14 * len(rows)) + 0.6 for _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(width, sum(heights) + 0.8), squeeze=False, layout="constrained", height_ratios=heights
    )
    for ax, (i, cols), value in zip(axes[:, 0], panels, values):
        image = ax.imshow(value, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cols)), [display_token(tokenizer.itos[train_ids[i, c]]) for c in cols], fontsize=6)
        ax.set_yticks(range(len(rows)), [display_token(tokenizer.itos[query_ids[r]]) for r in rows], fontsize=6)
        ax.tick_params(length=0)
        ax.set_title(f"train #{i} (cells sum to {value.sum():+.3g})", fontsize=8, loc="left")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="influence")
    fig.suptitle(title or "token-by-token influence (rows: query tokens, columns: training tokens)", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _colour(value: float, scale: float) -> str:
    """Diverging background: red for positive, blue for negative, opacity proportional to |value| / scale."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    rgb = "220,40,40" if value > 0 else "40,90,220"
    return f"rgba({rgb},{alpha:.3f})"


def _html_tokens(
    tokenizer: CharTokenizer,
    ids: np.ndarray,
    shown: np.ndarray,
    scores: Optional[np.ndarray],
    scale: float,
    muted: np.ndarray,
) -> str:
    """Spans of one sequence's tokens; tokens with a score get a coloured background and a tooltip."""
    parts = []
    for position in np.flatnonzero(shown):
        token = tokenizer.itos[int(ids[position])]
        text = html.escape("↵" if token == "\n" else token) + ("<br>" if token == "\n" else "")
        if scores is not None and not muted[position]:
            value = float(scores[position])
            style = f"background:{_colour(value, scale)}"
            parts.append(f'<span class="t" style="{style}" title="pos {position}: {value:+.4g}">{text}</span>')
        else:
            parts.append(f'<span class="t m">{text}</span>' if muted[position] else f'<span class="t">{text}</span>')
    return "".join(parts)


HTML_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:1em auto}} .seq{{font-family:monospace;white-space:pre-wrap;
line-height:1.7;border:1px solid #ddd;padding:4px;margin:2px 0}} .m{{color:#999}} .row{{display:flex;gap:12px}}
.row>div{{flex:1}} .cap{{font-size:12px;color:#555}} .cap b{{color:#222}}
.warn{{background:#fff3cd;border:1px solid #e0b000;padding:6px 8px}}</style></head><body><h1>{title}</h1>{warning}
<p class="cap">{caption}</p>
"""


def render_influence_html(
    path: Path,
    tokenizer: CharTokenizer,
    query_ids: np.ndarray,
    query_labels: np.ndarray,
    train_ids: np.ndarray,
    train_mask: np.ndarray,
    per_token: np.ndarray,
    token_scores: Optional[np.ndarray] = None,
    top_k: int = 3,
    title: str = "Per-token influence",
    note: str = "",
    warning: str = "",
) -> Path:
    """An HTML page of tokens coloured by influence (red positive, blue negative; paper Fig. 16-19).

    For every query, its top-k training sequences by summed score. Right: each training token coloured by its
    influence on the whole completion (`per_token` ``[Q, N, Tt]``). Left: each completion token coloured by the
    influence of the whole training sequence on it, when the token-by-token ``[Q, Tq, N, Tt]`` matrix is given
    (else the query is shown plain, prompt in grey). Colours share one scale per query and side. `warning` (e.g.
    the chains had not mixed, `mixing_warning`) is shown in a box above everything.
    """
    query_muted = query_labels == IGNORE_INDEX
    caption = (
        "Red: the training token helps (lowers the loss of) the query's completion; blue: it hurts. Grey text is "
        "the prompt (no loss). Hover a token for its score. " + note
    )
    banner = f'<p class="warn">{html.escape(warning)}</p>' if warning else ""
    out = [HTML_HEAD.format(title=html.escape(title), caption=caption, warning=banner)]
    for q in range(query_ids.shape[0]):
        query = (query_ids[q], query_muted[q])
        out += _query_html(tokenizer, q, query, train_ids, train_mask, per_token, token_scores, top_k)
    out.append("</body></html>\n")
    path = Path(path)
    path.write_text("".join(out), encoding="utf-8")
    return path


def _query_html(
    tokenizer: CharTokenizer,
    q: int,
    query: Tuple[np.ndarray, np.ndarray],
    train_ids: np.ndarray,
    train_mask: np.ndarray,
    per_token: np.ndarray,
    token_scores: Optional[np.ndarray],
    top_k: int,
) -> List[str]:
    """The heading and one row per top training sequence of query `q` (`query`: its ids and prompt mask)."""
    ids, muted = query
    top = top_train_sequences(per_token, q, top_k)
    left = [token_scores[q, :, i, :].sum(-1) if token_scores is not None else None for i in top]
    left_scale = max([float(np.abs(v[~muted]).max(initial=0)) for v in left if v is not None] + [0.0])
    right_scale = float(np.abs(per_token[q, top]).max(initial=0))
    out = [f"<h2>Query {q}</h2><p class='cap'>Its {len(top)} most helpful training sequences.</p>"]
    shown_q = ids != tokenizer.pad_id
    for rank, (i, scores) in enumerate(zip(top, left)):
        query_html = _html_tokens(tokenizer, ids, shown_q, scores, left_scale, muted)
        shown = train_mask[i].astype(bool)
        train_html = _html_tokens(tokenizer, train_ids[i], shown, per_token[q, i], right_scale, ~shown)
        total = float(per_token[q, i].sum())
        if scores is not None:
            left_cap = f"<b>query {q}</b>: each completion token coloured by the influence of train #{int(i)} on it"
        else:
            left_cap = f"<b>query {q}</b> (prompt in grey, completion in black)"
        right_cap = (
            f"<b>#{rank + 1} train #{int(i)}</b> (score {total:+.4g}): each token coloured by its influence on the "
            f"whole completion of query {q}"
        )
        out.append(
            f"<div class='row'><div><div class='cap'>{left_cap}</div><div class='seq'>{query_html}</div>"
            f"</div><div><div class='cap'>{right_cap}</div>"
            f"<div class='seq'>{train_html}</div></div></div>"
        )
    return out


def mixing_warning(scores_folder: Path) -> str:
    """One line for the page when the run's diagnostics say the chains had not mixed (rhat, slow_mixing), else ''."""
    from kronfluence_bif.storage import BIF_DIAGNOSTICS_FILE, load_json

    path = Path(scores_folder) / BIF_DIAGNOSTICS_FILE
    if not path.exists():
        return ""
    report = load_json(path)
    codes = {w["code"] for w in report.get("warnings", [])}
    if not codes & {"rhat", "slow_mixing"}:
        return ""
    rhat = report.get("rhat_mean_train_loss")
    ess = [c.get("ess_mean_train_loss") for c in report.get("chains", []) if c.get("ess_mean_train_loss") is not None]
    facts = ([f"R-hat {rhat:.2f}"] if rhat is not None else []) + (
        [f"about {min(ess):.0f} effective draws per chain"] if ess else []
    )
    facts.append("warnings: " + ", ".join(sorted(codes)))
    return (
        f"The BIF chains had not mixed ({'; '.join(facts)}): these scores are rough. What each warning means and "
        "what to change: README, 'When the diagnostics warn'."
    )


def render_all(
    out: Path,
    name: str,
    tokenizer: CharTokenizer,
    arrays: Dict[str, np.ndarray],
    per_token: np.ndarray,
    token_scores: Optional[np.ndarray],
    top: int,
    note: str = "",
    warning: str = "",
) -> List[Path]:
    """The HTML page for a method and, with token-by-token scores, one heatmap PNG per query."""
    paths = [
        render_influence_html(
            out / f"{name}_tokens.html",
            tokenizer,
            arrays["query_ids"],
            arrays["query_labels"],
            arrays["train_ids"],
            arrays["train_mask"],
            per_token,
            token_scores,
            top,
            title=f"{name}: per-token influence",
            note=note,
            warning=warning,
        )
    ]
    if token_scores is not None:
        for q in range(per_token.shape[0]):
            paths.append(
                plot_token_heatmaps(
                    out / f"{name}_heatmap_query{q}.png",
                    token_scores[q],
                    arrays["query_ids"][q],
                    arrays["query_valid"][q],
                    arrays["train_ids"],
                    arrays["train_mask"],
                    tokenizer,
                    top_train_sequences(per_token, q, top),
                    title=f"{name}, query {q}",
                )
            )
    return paths
