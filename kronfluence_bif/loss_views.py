"""Per-example views of a kronfluence Task: explicit method, else `torch.func.vmap`, else a loop."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from kronfluence_bif.errors import TaskContractError
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.task import BIFTask

ScalarFn = Callable[[Any, nn.Module], torch.Tensor]


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a (nested) batch."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise TaskContractError("Could not find a tensor with a batch dimension in the batch; batches must hold tensors.")


def slice_batch(batch: Any, index: torch.Tensor | slice) -> Any:
    """Select examples from every tensor leaf whose leading dimension is the batch size."""
    size = batch_size(batch)
    leaves, spec = tree_flatten(batch)
    out = [leaf[index] if is_batched(leaf, size) else leaf for leaf in leaves]
    return tree_unflatten(out, spec)


def is_batched(leaf: Any, size: int) -> bool:
    """A tensor leaf whose leading dimension is the batch's `size` examples."""
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == size


def describe_batch(batch: Any, limit: int = 4) -> str:
    """The leaves of a batch as `tensor[8, 5] float32, tensor[8] int64` (for error messages)."""
    leaves, _ = tree_flatten(batch)
    parts = [
        f"tensor{list(leaf.shape)} {str(leaf.dtype).replace('torch.', '')}"
        if isinstance(leaf, torch.Tensor)
        else type(leaf).__name__
        for leaf in leaves[:limit]
    ]
    return ", ".join(parts) + (f", ... ({len(leaves)} leaves)" if len(leaves) > limit else "")


def first_call(fn: Callable[[], Any], method: str, dataset: str, batch: Any) -> Any:
    """Call a Task method on a dataset's first batch; a failure becomes a TaskContractError naming both."""
    try:
        return fn()
    except TaskContractError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with what failed where, the original chained
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TaskContractError(
            f"{method} failed on the first batch of `{dataset}` ({type(exc).__name__}: {first}). That batch holds "
            f"{describe_batch(batch)}: check that `{dataset}` yields examples of the form (feature width, dtypes, "
            "label type) the model and the Task expect, e.g. the same as the training data."
        ) from exc


def _overrides(task: Any, name: str) -> bool:
    """True when the task defines `name` itself (not the NotImplementedError stub of BIFTask)."""
    method = getattr(type(task), name, None)
    return method is not None and method is not getattr(BIFTask, name, None)


class PerExampleView:
    """One value per example for one scalar Task method (train loss or measurement)."""

    def __init__(self, task: Any, scalar_name: str, per_example_name: str, scalar_fn: ScalarFn) -> None:
        self.task = task
        self.scalar_name = scalar_name
        self.per_example_name = per_example_name
        self.scalar_fn = scalar_fn
        self.mode: Optional[str] = "method" if _overrides(task, per_example_name) else None

    # ------------------------------------------------------------------ evaluation
    def __call__(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self.mode == "method":
            return getattr(self.task, self.per_example_name)(batch, model)
        if self.mode in (None, "vmap"):
            try:
                values = self._vmap(batch, model)
                if self.mode is None:
                    self.mode = "vmap"
                    logger.info("Per-example %s: vectorized with torch.func.vmap.", self.scalar_name)
                return values
            except Exception as exc:  # noqa: BLE001 - any vmap failure means: use the loop
                self.mode = "loop"
                warn_once(
                    f"loop-{self.scalar_name}-{type(self.task).__name__}",
                    f"`{type(self.task).__name__}.{self.scalar_name}` cannot be vectorized with torch.func.vmap "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); falling back to one "
                    f"call per example, which is slow. Define `{self.per_example_name}(batch, model)` returning one "
                    "value per example (see kronfluence_bif.BIFTask) to make BIF fast.",
                )
        return self._loop(batch, model)

    def _vmap(self, batch: Any, model: nn.Module) -> torch.Tensor:
        size = batch_size(batch)
        leaves, spec = tree_flatten(batch)
        dims = tuple(0 if is_batched(leaf, size) else None for leaf in leaves)

        def single(*items: Any) -> torch.Tensor:
            example = [item.unsqueeze(0) if dim == 0 else item for item, dim in zip(items, dims)]
            return self.scalar_fn(tree_unflatten(example, spec), model).reshape(())

        return torch.func.vmap(single, in_dims=dims, randomness="error")(*leaves)

    def _loop(self, batch: Any, model: nn.Module) -> torch.Tensor:
        size = batch_size(batch)
        values: List[torch.Tensor] = [
            self.scalar_fn(slice_batch(batch, slice(i, i + 1)), model).reshape(()) for i in range(size)
        ]
        return torch.stack(values)

    # ------------------------------------------------------------------ contract check
    def check(self, batch: Any, model: nn.Module, dataset: str = "the dataset") -> None:
        """Raise `TaskContractError` unless the per-example values have shape [B] and sum to the scalar method.

        The scalar method runs first, plainly: a batch that does not fit the model fails there, named, before any
        vmap attempt or loop fallback.
        """
        size = batch_size(batch)
        name = type(self.task).__name__
        scalar = first_call(lambda: self.scalar_fn(batch, model), f"`{name}.{self.scalar_name}`", dataset, batch)
        method = f"`{name}.{self.per_example_name}`" if self.mode == "method" else f"`{name}.{self.scalar_name}`"
        values = first_call(lambda: self(batch, model), method, dataset, batch)
        source = (
            f"`{type(self.task).__name__}.{self.per_example_name}`"
            if self.mode == "method"
            else f"per-example values derived from `{type(self.task).__name__}.{self.scalar_name}`"
        )
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (size,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise TaskContractError(
                f"{source} must return a tensor of shape [batch_size] = [{size}], got {shape}. "
                "Return one value per example (reduce over tokens/outputs, not over the batch)."
            )
        if not isinstance(scalar, torch.Tensor) or scalar.numel() != 1:
            raise TaskContractError(
                f"`{type(self.task).__name__}.{self.scalar_name}` must return a scalar tensor (the sum over the batch)."
            )
        total = values.double().sum()
        scalar64 = scalar.double().reshape(())
        tol = 1e-4 * (values.double().abs().sum() + scalar64.abs()) + 1e-6
        if not torch.isfinite(total) or not torch.isfinite(scalar64) or (total - scalar64).abs() > tol:
            ratio = float(total / scalar64) if float(scalar64) != 0 else float("nan")
            averages = size > 1 and abs(ratio - size) < 1e-3 * size
            raise TaskContractError(
                f"{source} sum to {float(total):.6g} on the first batch of {size} examples, but "
                f"`{type(self.task).__name__}.{self.scalar_name}` returned {float(scalar64):.6g}. "
                + self._mismatch_fix(averages)
            )

    def _mismatch_fix(self, averages: bool) -> str:
        """What to change when the per-example values do not sum to the scalar method (see `check`)."""
        scalar = f"`{type(self.task).__name__}.{self.scalar_name}`"
        if averages:
            return (
                f"That is 1/batch_size of the sum: {scalar} averages over the batch, but kronfluence expects the "
                'sum (its EK-FAC scores assume it too). Use reduction="sum" in it, e.g. '
                'F.mse_loss(outputs, targets, reduction="sum") or F.cross_entropy(logits, labels, reduction="sum").'
            )
        if self.mode == "method":
            return (
                f"Make `{self.per_example_name}` return per-example values that sum to `{self.scalar_name}` (one of "
                "the two computes a different loss)."
            )
        return (
            f"{scalar} is not a sum of per-example terms on this batch (batch statistics, e.g. BatchNorm in train "
            "mode, or a normalization by the batch?). Make it return the sum over the batch of per-example values, "
            f"or define `{self.per_example_name}(batch, model)` (see kronfluence_bif.BIFTask)."
        )


class PerTokenView:
    """One value per token, [B, T] (0 at masked tokens), from a BIFTask per-token method; checked against rows."""

    def __init__(self, task: Any, name: str, per_example: PerExampleView) -> None:
        if not _overrides(task, name):
            raise TaskContractError(
                f"Per-token scores need `{type(task).__name__}.{name}(batch, model)` returning a [batch_size, "
                "seq_len] tensor (0 at padded and masked tokens); see kronfluence_bif.BIFTask, or use "
                "kronfluence_bif.tasks.CausalLMTask for Hugging Face causal LMs."
            )
        self.task = task
        self.name = name
        self.per_example = per_example
        self.width: Optional[int] = None

    def __call__(self, batch: Any, model: nn.Module) -> torch.Tensor:
        values = getattr(self.task, self.name)(batch, model)
        if self.width is not None and (values.dim() != 2 or values.shape[1] != self.width):
            raise TaskContractError(
                f"`{type(self.task).__name__}.{self.name}` returned shape {tuple(values.shape)}, but the first batch "
                f"had {self.width} tokens per example. Pad every batch to one fixed length T, as kronfluence requires "
                "for per-token scores (e.g. padding='max_length')."
            )
        return values

    def check(self, batch: Any, model: nn.Module, dataset: str = "the dataset") -> None:
        """[B, T] values whose rows sum to the per-example values of the same examples."""
        size = batch_size(batch)
        method = getattr(self.task, self.name)
        values = first_call(lambda: method(batch, model), f"`{type(self.task).__name__}.{self.name}`", dataset, batch)
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[0] != size:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise TaskContractError(
                f"`{type(self.task).__name__}.{self.name}` must return [batch_size, seq_len] = [{size}, T], "
                f"got {shape}."
            )
        rows = values.double().sum(1)
        reference = self.per_example(batch, model).double()
        tol = 1e-4 * (rows.abs() + reference.abs()) + 1e-6
        if not bool(((rows - reference).abs() <= tol).all()):
            raise TaskContractError(
                f"The rows of `{type(self.task).__name__}.{self.name}` must sum to "
                f"`{self.per_example.per_example_name}` of the same examples (first batch: {rows[:3].tolist()} vs "
                f"{reference[:3].tolist()})."
            )
        self.width = int(values.shape[1])


class SequenceAndTokens:
    """Per example: the sequence value followed by its T token values, [B, 1 + T] (query side of per-token BIF)."""

    def __init__(self, sequence: PerExampleView, tokens: Optional[PerTokenView]) -> None:
        self.sequence = sequence
        self.tokens = tokens

    @property
    def width(self) -> Optional[int]:
        if self.tokens is None:
            return 1
        return None if self.tokens.width is None else 1 + self.tokens.width

    def __call__(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self.tokens is None:
            return self.sequence(batch, model).reshape(-1, 1)
        tokens = self.tokens(batch, model)  # one forward: the checked contract makes the row sums the sequence values
        return torch.cat([tokens.sum(1, keepdim=True), tokens], dim=1)

    def check(self, batch: Any, model: nn.Module, dataset: str = "the dataset") -> None:
        self.sequence.check(batch, model, dataset)
        if self.tokens is not None:
            self.tokens.check(batch, model, dataset)


class LossViews:
    """The per-example train losses and measurements BIF evaluates at every draw."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.train = PerExampleView(
            task,
            "compute_train_loss",
            "compute_per_example_train_loss",
            lambda batch, model: task.compute_train_loss(batch, model, sample=False),
        )
        self.measurement = PerExampleView(
            task, "compute_measurement", "compute_per_example_measurement", task.compute_measurement
        )

    def summed_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """The scalar loss whose gradient drives SGLD (kronfluence's own contract: summed over the batch)."""
        return self.task.compute_train_loss(batch, model, sample=False)

    def sampled_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """A scalar whose gradient has the Fisher as covariance (the curvature sketch): the Task's Gaussian
        `compute_fisher_probe` where it has one, else the summed loss with labels sampled from the model
        (kronfluence's Fisher gradients)."""
        if _overrides(self.task, "compute_fisher_probe"):
            return self.task.compute_fisher_probe(batch, model)
        return self.task.compute_train_loss(batch, model, sample=True)

    def train_tokens(self) -> PerTokenView:
        return PerTokenView(self.task, "compute_per_token_train_loss", self.train)

    def measurement_tokens(self, with_tokens: bool) -> SequenceAndTokens:
        """Query side of per-token scores: the sequence measurement, and its tokens when `with_tokens`."""
        tokens = None
        if with_tokens and _overrides(self.task, "compute_per_token_measurement"):
            tokens = PerTokenView(self.task, "compute_per_token_measurement", self.measurement)
        return SequenceAndTokens(self.measurement, tokens)
