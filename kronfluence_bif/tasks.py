"""Ready-made tasks for the common cases; they implement kronfluence's methods and BIF's per-example views."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kronfluence_bif.task import BIFTask


def precise_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", ignore_index: int = -100
) -> torch.Tensor:
    """`F.cross_entropy` over the last dimension, to the loss's own relative precision, in the logits' dtype.

    `F.cross_entropy` takes a confident example's loss log(1 + sum_k exp(z_k - z_y)) as the log of a float32 number
    next to 1, known only to about 6e-8: about the size of the loss's changes over BIF's posterior draws (digits
    at train loss 9e-4: LDS 0.418 -> 0.451 with this; BENCHMARKS.md, "Loss precision"). Its gradient carries the
    same rounding (p_y = 1 - t known to 6e-8), which costs EK-FAC as much (digits 0.421 -> 0.446). Here the loss is
    (m - z_y) + log1p(sum over k != argmax of exp(z_k - m)), m the largest logit, in float32 (or the logits' wider
    dtype): the same value, and autograd's gradient p - e_y has every entry to relative precision, with no float64
    copy of the logits (an LM's [tokens, vocab] logits stay their size). Labels equal to `ignore_index` give 0.
    `reduction`: "none", "sum", or "mean" (over the labels not ignored), as `F.cross_entropy`.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"precise_cross_entropy(reduction=...) must be 'none', 'sum' or 'mean', got {reduction!r}.")
    z = logits if logits.dtype == torch.float64 else logits.float()
    kept = labels != ignore_index
    top, where = z.max(dim=-1, keepdim=True)
    shifted = z - top  # <= 0, exactly 0 at the argmax
    rest = shifted.exp().scatter(-1, where, 0.0).sum(-1)  # sum over k != argmax of exp(z_k - m)
    safe = torch.where(kept, labels, 0).unsqueeze(-1)
    # z_y - m, exactly 0 with no gradient where the label is the argmax: through m and z_y its gradient would be
    # -1 + 1, and summed with log1p's -t / (1 + t) in float32 that t would be lost
    picked = torch.where(safe == where, torch.zeros_like(top), shifted.gather(-1, safe)).squeeze(-1)
    losses = torch.where(kept, torch.log1p(rest) - picked, torch.zeros_like(rest))
    if reduction == "sum":
        losses = losses.sum()
    elif reduction == "mean":
        losses = losses.sum() / kept.sum()
    return losses.to(logits.dtype)


def softmax_fisher_root(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L xi for L = diag(sqrt p) - p sqrt(p)^T, over the last dimension: L L^T = diag p - p p^T (the columns of p
    sum to 1), the cross-entropy's Hessian in the logits, so L xi for xi ~ N(0, I) has that covariance."""
    root = probs.sqrt()
    return root * noise - probs * (root * noise).sum(-1, keepdim=True)


def softmax_probe(logits: torch.Tensor) -> torch.Tensor:
    """sum <L xi, logits> over the rows of `logits` [..., C] with xi ~ N(0, I) and L (`softmax_fisher_root`) taken at
    the detached logits: its gradient J^T L xi has covariance J^T (diag p - p p^T) J, the cross-entropy's Fisher."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)
        direction = softmax_fisher_root(probs, torch.randn_like(probs))
    return (logits * direction.to(logits.dtype)).sum()


class RegressionTask(BIFTask):
    """Squared error on batches ``(inputs, targets)``: loss = sum over outputs of (model(inputs) - targets)^2.

    The measurement is the same loss on the query example (kronfluence's UCI example).
    """

    def __init__(self, tracked_modules: Optional[List[str]] = None) -> None:
        self.tracked_modules = tracked_modules

    def _per_example(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        outputs = model(inputs)
        if targets.dtype != outputs.dtype:
            targets = targets.to(outputs.dtype)
        if outputs.dim() != 2 or outputs.shape != targets.shape:  # the same values; [B, k] needs no views
            outputs, targets = outputs.reshape(outputs.shape[0], -1), targets.reshape(targets.shape[0], -1)
        return (outputs - targets).pow(2).sum(1)

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        if not sample:
            return self._per_example(batch, model).sum()
        inputs = batch[0]
        outputs = model(inputs)
        with torch.no_grad():
            sampled = torch.normal(outputs.detach(), std=torch.ones_like(outputs))
        return F.mse_loss(outputs, sampled, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._per_example(batch, model).sum()

    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._per_example(batch, model)

    def compute_per_example_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._per_example(batch, model)

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        return self.tracked_modules


class ClassificationTask(BIFTask):
    """Cross-entropy on batches ``(inputs, labels)``.

    `measurement="loss"` (default) measures the query's cross-entropy; `"margin"` measures minus the margin
    ``-(logit_y - logsumexp(other logits))`` (kronfluence's CIFAR example). Both are loss-like: a positive
    score means the training example helps the query.
    """

    def __init__(self, measurement: str = "loss", tracked_modules: Optional[List[str]] = None) -> None:
        if measurement not in ("loss", "margin"):
            raise ValueError(f"ClassificationTask(measurement=...) must be 'loss' or 'margin', got {measurement!r}.")
        self.measurement = measurement
        self.tracked_modules = tracked_modules

    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        return precise_cross_entropy(model(inputs), labels, reduction="none")

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        if not sample:
            return self.compute_per_example_train_loss(batch, model).sum()
        logits = model(batch[0])
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach().float(), -1), num_samples=1).flatten()
        return F.cross_entropy(logits, sampled, reduction="sum")

    def compute_fisher_probe(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Gaussian probe of the cross-entropy's Fisher (`softmax_probe`): every example in every sketch gradient."""
        return softmax_probe(model(batch[0]))

    def compute_per_example_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self.measurement == "loss":
            return self.compute_per_example_train_loss(batch, model)
        inputs, labels = batch[0], batch[1]
        logits = model(inputs)
        correct = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
        return -(correct - others.logsumexp(dim=1))

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_per_example_measurement(batch, model).sum()

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        return self.tracked_modules


IGNORE_INDEX = -100


def _logits(output: Any) -> torch.Tensor:
    """The logits of a causal LM's output: a `.logits` attribute (Hugging Face), a tuple's first item, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"CausalLMTask expects the model to return logits [batch, seq_len, vocab] as a tensor or as `.logits`, "
        f"got {type(output).__name__}."
    )


class CausalLMTask(BIFTask):
    """Next-token cross-entropy of a causal language model, for Hugging Face-style batches.

    Batches are dicts with ``input_ids`` and ``attention_mask`` ``[B, T]`` and ``labels`` ``[B, T]`` that hold
    ``-100`` where no loss is taken (padding, and the prompt of a prompt/completion query: the measurement of
    the paper's sec. 4.3). Without ``labels`` every attended token is a label. The model is called as
    ``model(input_ids=..., attention_mask=...)`` and returns logits ``[B, T, V]`` (a tensor or ``.logits``).

    Labels are shifted the Hugging Face way: the logits at position ``t`` predict ``labels[:, t + 1]``. Where a
    per-token value sits is set by `token_position`:

    - ``"input"`` (default, kronfluence's convention): column ``t`` holds the loss of the prediction made at
      position ``t`` (of token ``t + 1``). kronfluence's per-token scores come from the activations at position
      ``t``, whose effect is that prediction, so BIF's ``[n_query, n_train, T]`` file is index-aligned with
      EK-FAC's: the last real token is 0 in both.
    - ``"target"``: column ``t`` holds the loss of predicting token ``t`` (the paper's per-token loss on the
      predicted token); column 0 is 0.

    Either way every position whose predicted label is ``-100`` (or padding) is exactly 0. Everything is a sum
    (kronfluence's convention): per-example values are the row sums of the per-token values, and the scalar
    methods are the sums of the per-example values. Logits are upcast to float32 before the softmax.

    The measurement is the same summed loss on the query's labelled tokens (the completion's negative
    log-likelihood), so it is loss-like: a positive score means the training sequence helps the completion.
    `tracked_modules` (module names, or None for kronfluence's default: every ``nn.Linear``) is returned by
    `get_influence_tracked_modules`; for BIF it also restricts which weights are sampled.
    """

    def __init__(self, tracked_modules: Optional[List[str]] = None, token_position: str = "input") -> None:
        if token_position not in ("input", "target"):
            raise ValueError(f"CausalLMTask(token_position=...) must be 'input' or 'target', got {token_position!r}.")
        self.tracked_modules = tracked_modules
        self.token_position = token_position

    # ------------------------------------------------------------------ helpers
    def _forward(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Float32 logits ``[B, T, V]`` of the batch."""
        output = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return _logits(output).float()

    @staticmethod
    def _targets(batch: Any) -> torch.Tensor:
        """Labels ``[B, T]`` with -100 wherever no loss is taken (masked labels and padding)."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        labels = input_ids if labels is None else labels
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        return labels

    def _per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy ``[B, T]`` placed by `token_position`; exactly 0 where the predicted label is ignored."""
        batch, length, vocab = logits.shape
        targets = labels[:, 1:]
        losses = precise_cross_entropy(
            logits[:, :-1].reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(batch, length - 1)
        losses = torch.where(targets == IGNORE_INDEX, torch.zeros_like(losses), losses)
        return F.pad(losses, (0, 1) if self.token_position == "input" else (1, 0))

    def _sampled_labels(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels drawn from the model's softmax at the labelled positions (kronfluence's true-Fisher sampling)."""
        with torch.no_grad():
            probs = torch.softmax(logits[:, :-1].detach(), dim=-1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), num_samples=1).view(probs.shape[:-1])
        shifted = torch.where(labels[:, 1:] == IGNORE_INDEX, torch.full_like(drawn, IGNORE_INDEX), drawn)
        return F.pad(shifted, (1, 0), value=IGNORE_INDEX)

    # ------------------------------------------------------------------ per-token views
    def compute_per_token_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Loss of each next-token prediction, ``[B, T]`` (see `token_position`); 0 where no loss is taken."""
        return self._per_token(self._forward(batch, model), self._targets(batch))

    def compute_per_token_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Completion loss of each query token, ``[B, T]`` (the per-token train loss on the query)."""
        return self.compute_per_token_train_loss(batch, model)

    # ------------------------------------------------------------------ per-example views
    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Summed loss of each sequence, ``[B]``: the row sums of `compute_per_token_train_loss`."""
        return self.compute_per_token_train_loss(batch, model).sum(dim=1)

    def compute_per_example_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Summed completion loss of each query, ``[B]``."""
        return self.compute_per_example_train_loss(batch, model)

    # ------------------------------------------------------------------ kronfluence's methods
    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        """Summed next-token loss of the batch; with `sample=True` against labels drawn from the model."""
        if not sample:
            return self.compute_per_example_train_loss(batch, model).sum()
        logits = self._forward(batch, model)
        return self._per_token(logits, self._sampled_labels(logits, self._targets(batch))).sum(dim=1).sum()

    def compute_fisher_probe(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Gaussian probe of the next-token Fisher (`softmax_probe`) over the labelled positions."""
        logits = self._forward(batch, model)[:, :-1]
        labelled = self._targets(batch)[:, 1:] != IGNORE_INDEX
        return softmax_probe(logits[labelled])

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Summed completion loss of the query batch (the train loss on the query's labelled tokens)."""
        return self.compute_per_example_measurement(batch, model).sum()

    def get_attention_mask(self, batch: Any) -> Optional[torch.Tensor]:
        """The batch's ``attention_mask`` (kronfluence masks padded tokens out of its covariance factors)."""
        return batch.get("attention_mask")

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        return self.tracked_modules
