"""`BIFTask`: a kronfluence `Task` with optional per-example views that BIF uses directly."""

from __future__ import annotations

from typing import Any

import torch
from kronfluence.task import Task
from torch import nn


class BIFTask(Task):
    """A kronfluence Task that may also say how to compute one value per example.

    kronfluence's `compute_train_loss` and `compute_measurement` return one scalar summed over the batch.
    BIF needs the value of every example at every posterior draw. Override the methods below to return a
    tensor of shape ``[batch_size]`` whose sum equals the scalar method on the same batch; this is the
    fastest path. When a method is not overridden (or a plain kronfluence Task is used), kronfluence-bif
    derives per-example values itself: `torch.func.vmap` over single examples, else one call per example.
    On the first batch the per-example values are checked against the scalar methods.
    """

    def compute_per_example_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Training loss of each example, shape ``[batch_size]``; sums to ``compute_train_loss(batch, model)``."""
        raise NotImplementedError

    def compute_per_example_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Measurement of each example, shape ``[batch_size]``; sums to ``compute_measurement(batch, model)``."""
        raise NotImplementedError

    def compute_per_token_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Training loss of each token, shape ``[batch_size, seq_len]``, exactly 0 at padding and masked tokens.

        Needed for per-token scores (`ScoreArguments(compute_per_token_scores=True)`); each row sums to
        `compute_per_example_train_loss` of that example.
        """
        raise NotImplementedError

    def compute_per_token_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Measurement of each token, shape ``[batch_size, seq_len]``, 0 where masked (token-by-token scores)."""
        raise NotImplementedError
