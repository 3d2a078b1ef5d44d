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

    def compute_fisher_probe(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """A scalar whose gradient u is random with E[u u^T] = the Fisher (Gauss-Newton) of the batch's summed train
        loss, for the curvature sketch of `sketch_sgld` and `subspace_sgld`.

        Without it the sketch takes the gradient of ``compute_train_loss(batch, model, sample=True)``, whose
        covariance is the same but which, for a confident classifier, is nearly the same vector every time: a
        label drawn from the model differs from the argmax for about one example in 1 / (1 - max probability),
        so K such gradients span far fewer than K directions. A Gaussian probe ``sum_i <L_i xi_i, outputs_i>``,
        with L_i L_i^T the loss's Hessian in the outputs (detached) and xi_i standard normal, gives every example's
        share in every gradient (`ClassificationTask`, `CausalLMTask`). Draw the noise from torch's global
        generator: the sketch seeds it.
        """
        raise NotImplementedError
