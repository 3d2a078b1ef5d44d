"""Ready-made tasks for the common cases; they implement kronfluence's methods and BIF's per-example views."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kronfluence_bif.task import BIFTask


class RegressionTask(BIFTask):
    """Squared error on batches ``(inputs, targets)``: loss = sum over outputs of (model(inputs) - targets)^2.

    The measurement is the same loss on the query example (kronfluence's UCI example).
    """

    def __init__(self, tracked_modules: Optional[List[str]] = None) -> None:
        self.tracked_modules = tracked_modules

    def _per_example(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        outputs = model(inputs)
        diff = outputs.reshape(outputs.shape[0], -1) - targets.reshape(targets.shape[0], -1).to(outputs.dtype)
        return diff.pow(2).sum(1)

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
        return F.cross_entropy(model(inputs), labels, reduction="none")

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        if not sample:
            return self.compute_per_example_train_loss(batch, model).sum()
        logits = model(batch[0])
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach().float(), -1), num_samples=1).flatten()
        return F.cross_entropy(logits, sampled, reduction="sum")

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
