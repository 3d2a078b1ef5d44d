"""Per-token influence on a tiny character-level GPT-2 trained on Python's own help texts (no downloads).

    python -m kronfluence_bif.demo.tiny_lm                  # train 1073 steps on 1 thread (cached), then score
    python -m kronfluence_bif.demo.tiny_lm --steps 300      # fewer training steps

The corpus is CPython's `pydoc_data.topics` (the texts behind `help("for")`), split into paragraphs; a few
paragraphs are held out for the prompt/completion queries. A 2-layer GPT-2 (`GPT2Config` + `GPT2LMHeadModel`)
is trained on random 64-character windows of the rest, and its weights are cached in the output directory.
Influence is then computed for fixed-length training paragraphs against the queries' completions (labels -100
on the prompt, the paper's sec. 4.3 measurement), with one kronfluence-bif `Analyzer`:

- EK-FAC per-token scores (`ScoreArguments(compute_per_token_scores=True)`): ``[n_query, n_train, T]``, the
  influence of each training token on the whole completion. GPT-2's `Conv1D` layers are swapped for equivalent
  `nn.Linear` (`conv1d_to_linear`) so kronfluence tracks them.
- BIF per-token scores from one SGLD phase: the same kronfluence file, plus the token-by-token matrix
  ``[n_query, T_query, n_train, T_train]`` in `bif_token_scores.safetensors` (paper sec. 3.2, App. B.4).

It renders a heatmap of query tokens x training tokens for the top training sequences (paper Fig. 2), an HTML
page with tokens coloured by influence (Fig. 16-19), prints the top token pairs and how often they are the same
character, and the wall time and peak memory of each method.

Alignment: the Task's per-token values (and BIF's token scores) sit at the position of the token being
predicted. kronfluence's per-token score at position t comes from the activations of input token t, whose direct
effect is the prediction of token t + 1; `shift_to_targets` moves such scores to the predicted token.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import resource
import time
import unicodedata
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from kronfluence_bif.logs import logger
from kronfluence_bif.tasks import IGNORE_INDEX
from kronfluence_bif.threads import set_threads

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
MODEL_FILE, CONFIG_FILE, VOCAB_FILE, TRAINING_FILE = "model.safetensors", "config.json", "vocab.json", "training.json"
# a fixed number of steps, so every machine trains the same model (1073 is what 150 s gave on the development
# machine when the example trained for a time budget; `--train-seconds` still does that, as an opt-in)
DEFAULT_TRAIN_STEPS = 1073
# kronfluence-bif's defaults (step 3e-4, nbeta 1000, gamma 1000: `calibrate` recommends this step on this model),
# fewer and shorter chains for a CPU demo, and correlations (the paper's normalized BIF, used for its figures)
# the example's measured settings, pinned (sketch-SGLD at nbeta >= 3e3 explodes on small GPT-2s, README "Defaults")
DEFAULT_BIF_ARGS: Dict[str, Any] = {
    "sampler": "rmsprop_sgld",
    "nbeta": 1000.0,
    "num_chains": 2,
    "num_draws": 300,
    "num_burnin_steps": 50,
    "sampler_batch_size": 32,
    "normalize": True,
}


# ====================================================================== corpus and tokenizer
class CharTokenizer:
    """Character-level tokenizer: id 0 is padding, id 1 stands for characters not seen in the corpus.

    The vocabulary is every character of the corpus in sorted order, so it is deterministic for a given corpus.
    """

    pad_id, unk_id = 0, 1

    def __init__(self, chars: Sequence[str]) -> None:
        self.itos: List[str] = [PAD_TOKEN, UNK_TOKEN, *chars]
        self.stoi: Dict[str, int] = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(ch, self.unk_id) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, padding dropped."""
        return "".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)


def display_token(token: str) -> str:
    """A visible form of a character for tick labels and tables (space, newline and tab get symbols)."""
    return {" ": "␣", "\n": "↵", "\t": "⇥", PAD_TOKEN: "", UNK_TOKEN: "�"}.get(token, token)


def load_corpus() -> str:
    """CPython's pydoc help topics joined in sorted topic order (ships with Python, no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def split_paragraphs(text: str) -> List[str]:
    """Unique blank-line-separated paragraphs, in order, without heading underlines."""
    text = re.sub(r"(?m)^[ \t]*[*=~^-]{3,}[ \t]*$", "", text)
    seen, out = set(), []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n").rstrip()
        if not block.strip():
            continue
        if block not in seen:
            seen.add(block)
            out.append(block)
    return out


@dataclass
class CorpusSplit:
    """Paragraphs for training (and their joined text) and held-out paragraphs for queries."""

    train_paragraphs: List[str]
    heldout_paragraphs: List[str]
    train_text: str = field(repr=False)


def split_corpus(text: str, heldout_fraction: float = 0.05, seed: int = 0) -> CorpusSplit:
    """Hold out a seeded random `heldout_fraction` of the paragraphs; the model never trains on them."""
    paragraphs = split_paragraphs(text)
    order = np.random.RandomState(seed).permutation(len(paragraphs))
    n_heldout = max(1, int(round(heldout_fraction * len(paragraphs))))
    heldout = [paragraphs[i] for i in sorted(order[:n_heldout])]
    train = [paragraphs[i] for i in sorted(order[n_heldout:])]
    return CorpusSplit(train, heldout, "\n\n".join(train))


# ====================================================================== datasets
class TokenDataset(Dataset):
    """Fixed-length sequences as dicts of ``input_ids``, ``attention_mask`` and ``labels`` (all ``[T]`` int64)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, indices: Sequence[int]) -> TokenDataset:
        """The sequences at `indices`, in that order."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TokenDataset(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def encode_fixed(tokenizer: CharTokenizer, text: str, length: int, prompt_chars: int = 0) -> Tuple[List[int], ...]:
    """(input_ids, attention_mask, labels) of `text` truncated/right-padded to `length`.

    Labels are -100 on padding and on the first `prompt_chars` characters (the prompt of a query).
    """
    ids = tokenizer.encode(text)[:length]
    n = len(ids)
    input_ids = ids + [tokenizer.pad_id] * (length - n)
    mask = [1] * n + [0] * (length - n)
    labels = [IGNORE_INDEX if (i < prompt_chars or i >= n) else tok for i, tok in enumerate(input_ids)]
    return input_ids, mask, labels


def make_dataset(
    tokenizer: CharTokenizer, texts: Sequence[str], length: int, prompts: Sequence[int] = ()
) -> TokenDataset:
    """A TokenDataset of `texts` at fixed `length`; `prompts[i]` characters of text i take no loss."""
    rows = [encode_fixed(tokenizer, t, length, prompts[i] if prompts else 0) for i, t in enumerate(texts)]
    ids, mask, labels = (torch.tensor([row[k] for row in rows], dtype=torch.long) for k in range(3))
    return TokenDataset(ids, mask, labels)


def make_train_dataset(
    tokenizer: CharTokenizer, paragraphs: Sequence[str], length: int = 64, limit: Optional[int] = None
) -> Tuple[TokenDataset, List[str]]:
    """Training paragraphs of at least length/4 characters (the first `limit`), truncated/padded to `length`.

    This is the data the BIF posterior conditions on (and EK-FAC fits its factors on); a subset is scored.
    """
    texts = [p[:length] for p in paragraphs if len(p) >= length // 4][:limit]
    return make_dataset(tokenizer, texts, length), texts


def choose_scored(n_total: int, n: int, seed: int = 0) -> List[int]:
    """`n` seeded random indices out of `n_total`, sorted: the training sequences whose influence is scored."""
    return sorted(int(i) for i in np.random.RandomState(seed).choice(n_total, size=min(n, n_total), replace=False))


def _is_prose(paragraph: str) -> bool:
    return not paragraph.startswith(" ") and "::=" not in paragraph and ">>>" not in paragraph


def make_queries(
    tokenizer: CharTokenizer,
    heldout: Sequence[str],
    train_text: str,
    n: int = 6,
    length: int = 64,
    seed: int = 0,
) -> Tuple[TokenDataset, List[Tuple[str, str]]]:
    """`n` prompt/completion queries from held-out prose paragraphs, absent from the training text (up to whitespace).

    Each query is the paragraph's start (whitespace collapsed) cut at a word boundary to at most `length - 1`
    characters and split at the word boundary nearest its middle; labels are -100 on the prompt and padding.
    """
    pairs: List[Tuple[str, str]] = []
    flat_train = " ".join(train_text.split())
    for index in np.random.RandomState(seed).permutation(len(heldout)):
        paragraph = heldout[index]
        text = " ".join(paragraph.split())
        if not _is_prose(paragraph) or len(text) < length // 2:
            continue
        if len(text) >= length:
            text = text[: max(0, text.rfind(" ", 0, length))]
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        if not spaces or text in flat_train:
            continue
        cut = min(spaces, key=lambda i: abs(i - len(text) / 2))
        pairs.append((text[:cut], text[cut:]))
        if len(pairs) == n:
            break
    if not pairs:
        raise ValueError("No held-out prose paragraph is long enough for a query; raise the held-out fraction.")
    dataset = make_dataset(tokenizer, [p + c for p, c in pairs], length, [len(prompt) for prompt, _ in pairs])
    return dataset, pairs


# ====================================================================== model
def make_model(
    vocab_size: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, context: int = 64, seed: int = 0
) -> nn.Module:
    """A small GPT-2 (`GPT2LMHeadModel`): dropout off, seeded initialization, untied output layer.

    The output layer (`lm_head`) has its own weight, so EK-FAC's tracked `lm_head` and BIF's sampled `lm_head`
    are the same weights and do not also move the input embedding.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=CharTokenizer.pad_id,
        eos_token_id=CharTokenizer.pad_id,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(config)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every `transformers.pytorch_utils.Conv1D` by the equivalent `nn.Linear`, in place.

    GPT-2's Conv1D computes ``x @ W + b`` with ``W`` of shape ``[in, out]``; kronfluence tracks only `nn.Linear`
    and `nn.Conv2d`, so the swap (weight transposed, same bias, same device and dtype) makes GPT-2's attention
    and MLP weights visible to EK-FAC without changing the function.
    """
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = nn.Linear(in_features, out_features, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                linear.weight.requires_grad_(child.weight.requires_grad)
                linear.bias.requires_grad_(child.bias.requires_grad)
                setattr(module, child_name, linear)
    return model


def linear_module_names(model: nn.Module) -> List[str]:
    """Names of every `nn.Linear` of the model (what EK-FAC tracks, and what BIF samples in the demo)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


# ====================================================================== training
@dataclass
class TrainingStats:
    """What training did: steps, seconds, final training loss (nats/char, EMA) and held-out loss."""

    steps: int
    seconds: float
    train_loss: float
    heldout_loss: float
    threads: int
    cached: bool = False  # True when the weights were loaded from the cache instead of trained by this run
    recipe: Dict[str, Any] = field(default_factory=dict)  # the training arguments: a cached model must match them


def _windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return torch.stack([ids[s : s + context] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: torch.Tensor, context: int, n_windows: int = 64, seed: int = 1) -> float:
    """Mean next-character loss (nats) over seeded random windows of `ids`."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, max(1, len(ids) - context), (n_windows,), generator=gen)
    batch = _windows(ids, starts, context)
    loss = float(model(input_ids=batch, labels=batch).loss)
    model.train(was_training)
    return loss


def _learning_rate(progress: float, lr: float, warmup: float = 0.05) -> float:
    """Linear warmup then cosine decay to 10% of `lr`, as a function of training progress in [0, 1]."""
    if progress < warmup:
        return lr * progress / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def train_lm(
    model: nn.Module,
    train_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    context: int = 64,
    seconds: Optional[float] = None,
    steps: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    disable_tqdm: bool = False,
) -> TrainingStats:
    """AdamW on random `context`-character windows for `steps` steps (default DEFAULT_TRAIN_STEPS), or, when only
    `seconds` is given, for that much wall time (then the result depends on the machine's speed and load)."""
    if steps is None and seconds is None:
        steps = DEFAULT_TRAIN_STEPS
    if steps is not None and seconds is not None:
        raise ValueError("train_lm takes `steps` or `seconds` (a time budget), not both.")
    recipe = training_recipe(steps, seconds, batch_size, lr, seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    model.train()
    start, step, ema = time.perf_counter(), 0, float("nan")
    total = steps if steps is not None else int(seconds)
    with tqdm(total=total, desc="training", unit="step" if steps else "s", disable=disable_tqdm) as bar:
        while True:
            elapsed = time.perf_counter() - start
            progress = step / steps if steps is not None else elapsed / seconds
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(progress, lr)
            starts = torch.randint(0, len(train_ids) - context, (batch_size,), generator=gen)
            batch = _windows(train_ids, starts, context)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = loss.item()
            ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
            step += 1
            bar.update(1 if steps is not None else int(time.perf_counter() - start) - bar.n)
            bar.set_postfix(loss=f"{ema:.3f}")
            if step % 200 == 0:
                logger.info("step %d: training loss %.3f nats/char", step, ema)
    model.eval()
    seconds = time.perf_counter() - start
    heldout = heldout_loss(model, heldout_ids, context)
    return TrainingStats(step, seconds, ema, heldout, torch.get_num_threads(), recipe=recipe)


def training_recipe(
    steps: Optional[int] = None,
    seconds: Optional[float] = None,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    **_: Any,
) -> Dict[str, Any]:
    """What determines the trained weights (with the model config and vocabulary): the cache key of `load_or_train`."""
    if steps is None and seconds is None:
        steps = DEFAULT_TRAIN_STEPS
    return {
        "steps": steps,
        "seconds": seconds if steps is None else None,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }


def load_or_train(
    output_dir: Path,
    tokenizer: CharTokenizer,
    split: CorpusSplit,
    model_kwargs: Dict[str, Any],
    train_kwargs: Dict[str, Any],
    retrain: bool = False,
) -> Tuple[nn.Module, TrainingStats]:
    """The trained model from `output_dir` when its config and vocabulary match, else train it and cache it."""
    from safetensors.torch import load_model, save_model

    output_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(len(tokenizer), **model_kwargs)
    files = [output_dir / name for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, TRAINING_FILE)]
    config = model.config.to_diff_dict()
    if not retrain and all(f.exists() for f in files):
        cached_config = json.loads(files[1].read_text())
        cached_stats = json.loads(files[3].read_text())
        same = json.loads(files[2].read_text()) == tokenizer.itos and cached_config == json.loads(json.dumps(config))
        if same and cached_stats.get("recipe") == training_recipe(**train_kwargs):
            load_model(model, str(files[0]))
            logger.info("Loaded the trained model from %s (delete it or pass --retrain to train again).", files[0])
            return model.eval(), TrainingStats(**{**cached_stats, "cached": True})
        logger.info("Cached model in %s does not match this configuration or recipe; training again.", output_dir)
    train_ids = torch.tensor(tokenizer.encode(split.train_text), dtype=torch.long)
    heldout_ids = torch.tensor(tokenizer.encode("\n\n".join(split.heldout_paragraphs)), dtype=torch.long)
    stats = train_lm(model, train_ids, heldout_ids, context=model_kwargs.get("context", 64), **train_kwargs)
    save_model(model, str(files[0]))
    files[1].write_text(json.dumps(config, indent=2))
    files[2].write_text(json.dumps(tokenizer.itos, ensure_ascii=False))
    files[3].write_text(json.dumps(asdict(stats), indent=2))
    return model.eval(), stats


# ====================================================================== measuring
@dataclass
class Usage:
    """Wall time (s) and peak resident memory (MiB) of a block; `peak_delta_mib` is above the RSS at its start."""

    seconds: float = 0.0
    peak_mib: float = 0.0
    peak_delta_mib: float = 0.0
    exact_peak: bool = True


def _status_kib(key: str) -> Optional[int]:
    try:
        match = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Iterator[Usage]:
    """Time a block and record its peak RSS (exact on Linux; else the process peak from `getrusage`)."""
    usage = Usage()
    exact = _reset_peak_rss()
    start_rss = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") if exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            usage.exact_peak = False
        usage.peak_mib = peak / 1024
        usage.peak_delta_mib = max(0.0, (peak - start_rss) / 1024)


# ====================================================================== analysis of score arrays
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


# ====================================================================== rendering
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
        top = top_train_sequences(per_token, q, top_k)
        left = [token_scores[q, :, i, :].sum(-1) if token_scores is not None else None for i in top]
        left_scale = max([float(np.abs(v[~query_muted[q]]).max(initial=0)) for v in left if v is not None] + [0.0])
        right_scale = float(np.abs(per_token[q, top]).max(initial=0))
        out.append(f"<h2>Query {q}</h2><p class='cap'>Its {len(top)} most helpful training sequences.</p>")
        shown_q = query_ids[q] != tokenizer.pad_id
        for rank, (i, scores) in enumerate(zip(top, left)):
            query_html = _html_tokens(tokenizer, query_ids[q], shown_q, scores, left_scale, query_muted[q])
            train_html = _html_tokens(
                tokenizer,
                train_ids[i],
                train_mask[i].astype(bool),
                per_token[q, i],
                right_scale,
                ~train_mask[i].astype(bool),
            )
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
    out.append("</body></html>\n")
    path = Path(path)
    path.write_text("".join(out), encoding="utf-8")
    return path


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


# ====================================================================== influence runs
def _score_inputs(train: TokenDataset, queries: TokenDataset) -> Dict[str, np.ndarray]:
    """Token ids and masks as numpy arrays; scored tokens are those with a label at positions > 0."""
    query_valid = queries.labels.numpy() != IGNORE_INDEX
    train_valid = train.labels.numpy() != IGNORE_INDEX
    query_valid[:, 0] = train_valid[:, 0] = False
    return {
        "query_ids": queries.input_ids.numpy(),
        "query_labels": queries.labels.numpy(),
        "query_valid": query_valid,
        "train_ids": train.input_ids.numpy(),
        "train_mask": train.attention_mask.numpy().astype(bool),
        "train_valid": train_valid,
    }


def _pairwise_kwargs(queries: TokenDataset, train_indices: Optional[Sequence[int]], batch_size: int) -> Dict[str, Any]:
    from kronfluence_bif import ScoreArguments

    return dict(
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        train_indices=None if train_indices is None else list(train_indices),
        score_args=ScoreArguments(compute_per_token_scores=True),
        overwrite_output_dir=True,
    )


def run_ekfac_per_token(
    analyzer: Any,
    train: TokenDataset,
    queries: TokenDataset,
    train_indices: Optional[Sequence[int]] = None,
    batch_size: int = 32,
) -> Tuple[np.ndarray, Usage]:
    """EK-FAC factors (on all of `train`) and per-token scores ``[n_query, n_scored, T]``, with time and memory."""
    from kronfluence_bif import FactorArguments

    with measure() as usage:
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        kwargs = _pairwise_kwargs(queries, train_indices, batch_size)
        analyzer.compute_pairwise_scores("ekfac_per_token", "ekfac", queries, train, **kwargs)
    return analyzer.load_pairwise_scores("ekfac_per_token")["all_modules"].float().numpy(), usage


def run_bif_per_token(
    analyzer: Any,
    train: TokenDataset,
    queries: TokenDataset,
    bif_args: Any,
    train_indices: Optional[Sequence[int]] = None,
    batch_size: int = 32,
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Usage]:
    """BIF per-token scores ``[Q, N, Tt]`` and token-by-token ``[Q, Tq, N, Tt]`` (None where not supported).

    The posterior conditions on all of `train`; only `train_indices` are scored (paper, App. C).
    """
    from kronfluence_bif import FactorArguments
    from kronfluence_bif.storage import BIF_TOKEN_SCORES_FILE

    with measure() as usage:
        analyzer.fit_all_factors(
            "bif", train, factor_args=FactorArguments(strategy="bif"), bif_args=bif_args, overwrite_output_dir=True
        )
        try:
            kwargs = _pairwise_kwargs(queries, train_indices, batch_size)
            analyzer.compute_pairwise_scores("bif_per_token", "bif", queries, train, **kwargs)
        except ValueError as exc:
            if "compute_per_token_scores" not in str(exc):
                raise
            logger.warning("BIF per-token scores are not available in this version: %s", exc)
            return None, None, usage
    per_token = analyzer.load_pairwise_scores("bif_per_token")["all_modules"].float().numpy()
    token_file = Path(analyzer.output_dir) / "scores_bif_per_token" / BIF_TOKEN_SCORES_FILE
    token_scores = analyzer.load_file(token_file)["all_modules"].float().numpy() if token_file.exists() else None
    return per_token, token_scores, usage


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


# ====================================================================== script
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kronfluence_bif.demo.tiny_lm", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="./influence_results/tiny_lm", help="model cache, scores and renders")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default {DEFAULT_TRAIN_STEPS}, the same on any machine)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="train for this wall-time budget instead of a number of steps (results then depend on the machine)",
    )
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--context", type=int, default=64, help="model context = fixed sequence length T")
    parser.add_argument("--n-train", type=int, default=128, help="training sequences scored")
    parser.add_argument("--n-posterior", type=int, default=None, help="training sequences in the posterior (all)")
    parser.add_argument("--n-query", type=int, default=6, help="prompt/completion queries")
    parser.add_argument("--top", type=int, default=3, help="training sequences shown per query")
    parser.add_argument("--bif-args", default="{}", help="JSON overrides of the demo's BIFArguments")
    parser.add_argument("--skip-bif", action="store_true", help="EK-FAC only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    return parser.parse_args(argv)


def _print_usage(name: str, usage: Usage) -> None:
    peak = "peak RSS" if usage.exact_peak else "process peak RSS so far"
    print(f"  {name:24s} {usage.seconds:7.1f} s   {peak} {usage.peak_mib:7.0f} MiB (+{usage.peak_delta_mib:.0f} MiB)")


def report_token_pairs(
    token_scores: np.ndarray, arrays: Dict[str, np.ndarray], tokenizer: CharTokenizer, k: int = 100, show: int = 12
) -> Dict[str, Tuple[float, float]]:
    """Print the top token pairs and how often the paired characters are related, against the base rate."""
    pairs = top_token_pairs(token_scores, arrays["query_valid"], arrays["train_valid"], k)
    print(f"\nTop {min(show, len(pairs))} of the {len(pairs)} largest token pairs (query token <- training token):")
    for line in format_pairs(pairs[:show], tokenizer, arrays["query_ids"], arrays["train_ids"]):
        print("  " + line)
    rates = relation_rates(
        pairs,
        arrays["query_ids"],
        arrays["train_ids"],
        arrays["query_valid"],
        arrays["train_valid"],
        relation_matrices(tokenizer),
    )
    print(f"Among the top {len(pairs)} pairs vs all valid pairs (base rate):")
    for name, (top, base) in rates.items():
        print(f"  {name:40s} {top:6.2f}  vs {base:6.3f}")
    return rates


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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or load) the tiny LM, score per token with EK-FAC and BIF, render and print; returns the results."""
    args = parse_args(argv)
    if args.steps is not None and args.train_seconds is not None:
        raise SystemExit("error: give --steps or --train-seconds, not both")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    set_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    text = load_corpus()
    tokenizer, split = CharTokenizer.from_text(text), split_corpus(text, seed=args.seed)
    model_kwargs = {"n_layer": args.n_layer, "n_embd": args.n_embd, "context": args.context, "seed": args.seed}
    train_kwargs = {"seconds": args.train_seconds, "steps": args.steps, "seed": args.seed, "disable_tqdm": args.quiet}
    print(
        f"Corpus: {len(text)} characters, {len(tokenizer)} tokens; {len(split.heldout_paragraphs)} held-out paragraphs"
    )
    model, stats = load_or_train(out / "model", tokenizer, split, model_kwargs, train_kwargs, args.retrain)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Model: GPT-2 {args.n_layer} layers x {args.n_embd}, {n_params / 1e3:.0f}k parameters; "
        f"{'loaded from the cache (--retrain to train again), ' if stats.cached else ''}trained {stats.steps} "
        f"steps in {stats.seconds:.0f} s ({stats.threads} thread(s)): loss {stats.train_loss:.3f} nats/char, "
        f"held-out {stats.heldout_loss:.3f}"
    )
    return score_and_render(model, tokenizer, split, out, args)


def score_and_render(model: nn.Module, tokenizer: CharTokenizer, split: CorpusSplit, out: Path, args) -> Dict[str, Any]:
    """Per-token EK-FAC and BIF on the trained model, then the renders and printed statistics."""
    from kronfluence_bif import Analyzer, BIFArguments, CausalLMTask, prepare_model

    train, _ = make_train_dataset(tokenizer, split.train_paragraphs, args.context, args.n_posterior)
    scored = choose_scored(len(train), args.n_train, args.seed)
    queries, pairs = make_queries(
        tokenizer, split.heldout_paragraphs, split.train_text, args.n_query, args.context, args.seed
    )
    for q, (prompt, completion) in enumerate(pairs):
        print(f"  query {q}: {prompt!r} -> {completion!r}")
    model = conv1d_to_linear(model)
    # the demo shows each loss on the token it predicts ("target"); EK-FAC is shifted the same way for display
    task = CausalLMTask(tracked_modules=linear_module_names(model), token_position="target")
    model = prepare_model(model, task)
    analyzer = Analyzer("scores", model, task, cpu=True, output_dir=str(out), disable_tqdm=args.quiet)
    arrays = _score_inputs(train.subset(scored), queries)
    results: Dict[str, Any] = {"pairs": pairs, "arrays": arrays, "scored": scored}
    print(f"Training sequences: {len(train)} (posterior / EK-FAC factors), {len(scored)} scored; T = {args.context}")

    ekfac, results["ekfac_usage"] = run_ekfac_per_token(analyzer, train, queries, scored)
    results["ekfac"] = ekfac
    print(f"\nEK-FAC per-token scores {list(ekfac.shape)} -> {out}/scores/scores_ekfac_per_token/")
    # kronfluence's score at input position t is (almost all) the prediction of token t + 1: show it there
    note = "EK-FAC's score at input position t is shown on the token it predicts (t + 1), see `shift_to_targets`."
    results["renders"] = render_all(out, "ekfac", tokenizer, arrays, shift_to_targets(ekfac), None, args.top, note)
    if not args.skip_bif:
        bif_args = BIFArguments(**{**DEFAULT_BIF_ARGS, **json.loads(args.bif_args)})
        bif, token_scores, results["bif_usage"] = run_bif_per_token(analyzer, train, queries, bif_args, scored)
        results.update(bif=bif, bif_token_scores=token_scores)
        if bif is not None:
            shape = None if token_scores is None else list(token_scores.shape)
            print(f"BIF per-token scores {list(bif.shape)}; token-by-token {shape}")
            warning = mixing_warning(out / "scores" / "scores_bif_per_token")
            if warning:
                print(warning)
            results["renders"] += render_all(out, "bif", tokenizer, arrays, bif, token_scores, args.top, "", warning)
            results["agreement"] = per_token_agreement(ekfac, bif, arrays["train_valid"])
            print("Agreement EK-FAC vs BIF (mean per-query Spearman): " + json.dumps(results["agreement"]))
        if token_scores is not None:
            results["relations"] = report_token_pairs(token_scores, arrays, tokenizer)
    print("\nCost (fit + per-token scores):")
    _print_usage("EK-FAC", results["ekfac_usage"])
    if "bif_usage" in results:
        _print_usage("BIF", results["bif_usage"])
    print("Renders: " + ", ".join(str(p) for p in results["renders"]))
    return results


if __name__ == "__main__":
    main()
