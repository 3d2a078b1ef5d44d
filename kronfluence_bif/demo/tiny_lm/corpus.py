"""The corpus (CPython's pydoc help topics), its character tokenizer, and the fixed-length datasets.

Training paragraphs become fixed-length sequences for the posterior and the scores; a few held-out prose
paragraphs become prompt/completion queries (labels -100 on the prompt, the paper's sec. 4.3 measurement).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from kronfluence_bif.tasks import IGNORE_INDEX

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


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
