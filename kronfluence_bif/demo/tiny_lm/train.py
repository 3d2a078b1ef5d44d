"""Training the tiny GPT-2 on random windows of the corpus, and caching its weights by config and recipe."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from kronfluence_bif.demo.tiny_lm.corpus import CharTokenizer, CorpusSplit
from kronfluence_bif.demo.tiny_lm.model import make_model
from kronfluence_bif.logs import logger

MODEL_FILE, CONFIG_FILE, VOCAB_FILE, TRAINING_FILE = "model.safetensors", "config.json", "vocab.json", "training.json"

# a fixed number of steps, so every machine trains the same model (1073 is what 150 s gave on the development
# machine when the example trained for a time budget; `--train-seconds` still does that, as an opt-in)
DEFAULT_TRAIN_STEPS = 1073


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


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One AdamW step on the next-character loss of `batch` (gradients clipped to norm 1); the loss before it."""
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


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
            value = _train_step(model, optimizer, _windows(train_ids, starts, context))
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


def _cache_files(output_dir: Path) -> List[Path]:
    """The weights, config, vocabulary and training stats of a cached model, in that order."""
    return [output_dir / name for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, TRAINING_FILE)]


def _load_cached(
    output_dir: Path, model: nn.Module, config: Dict[str, Any], tokenizer: CharTokenizer, train_kwargs: Dict[str, Any]
) -> Optional[TrainingStats]:
    """Load the cached weights into `model` when config, vocabulary and recipe match; their stats, else None."""
    from safetensors.torch import load_model

    files = _cache_files(output_dir)
    if not all(f.exists() for f in files):
        return None
    cached_config = json.loads(files[1].read_text())
    cached_stats = json.loads(files[3].read_text())
    same = json.loads(files[2].read_text()) == tokenizer.itos and cached_config == json.loads(json.dumps(config))
    if same and cached_stats.get("recipe") == training_recipe(**train_kwargs):
        load_model(model, str(files[0]))
        logger.info("Loaded the trained model from %s (delete it or pass --retrain to train again).", files[0])
        return TrainingStats(**{**cached_stats, "cached": True})
    logger.info("Cached model in %s does not match this configuration or recipe; training again.", output_dir)
    return None


def _save_trained(
    output_dir: Path, model: nn.Module, config: Dict[str, Any], tokenizer: CharTokenizer, stats: TrainingStats
) -> None:
    """Cache the weights with what identifies them: config, vocabulary and training stats (with the recipe)."""
    from safetensors.torch import save_model

    files = _cache_files(output_dir)
    save_model(model, str(files[0]))
    files[1].write_text(json.dumps(config, indent=2))
    files[2].write_text(json.dumps(tokenizer.itos, ensure_ascii=False))
    files[3].write_text(json.dumps(asdict(stats), indent=2))


def load_or_train(
    output_dir: Path,
    tokenizer: CharTokenizer,
    split: CorpusSplit,
    model_kwargs: Dict[str, Any],
    train_kwargs: Dict[str, Any],
    retrain: bool = False,
) -> Tuple[nn.Module, TrainingStats]:
    """The trained model from `output_dir` when its config and vocabulary match, else train it and cache it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(len(tokenizer), **model_kwargs)
    config = model.config.to_diff_dict()  # before training, as the cache compares it with a fresh model's
    cached = None if retrain else _load_cached(output_dir, model, config, tokenizer, train_kwargs)
    if cached is not None:
        return model.eval(), cached
    train_ids = torch.tensor(tokenizer.encode(split.train_text), dtype=torch.long)
    heldout_ids = torch.tensor(tokenizer.encode("\n\n".join(split.heldout_paragraphs)), dtype=torch.long)
    stats = train_lm(model, train_ids, heldout_ids, context=model_kwargs.get("context", 64), **train_kwargs)
    _save_trained(output_dir, model, config, tokenizer, stats)
    return model.eval(), stats
