"""A low-rank sketch of the loss curvature at w*, from gradients only (no Hessian, no layer structure).

The sketch is the Fisher of the per-example loss estimated from K minibatch gradients u whose covariance is the
Fisher: the Task's Gaussian probe (`BIFTask.compute_fisher_probe`: sum_i <L_i xi_i, outputs_i>, L_i L_i^T the loss's
Hessian in the outputs; `ClassificationTask` and `CausalLMTask` have one), else kronfluence's sampled-label loss
(`Task.compute_train_loss(batch, model, sample=True)`, the gradients EK-FAC fits its factors on). For a minibatch B
of m examples, u = grad of that scalar over B / sqrt(m) has E[u u^T] = mean Fisher. Stacking K of them gives
F_K = U U^T / K, stored as an orthonormal basis V [p, k] and eigenvalues s [k].
`SketchSGLD` uses it to precondition SGLD with (nbeta F_K + localization)^-1, which equalizes the mixing speed of
stiff and flat directions (the paper's preconditioned SGLD, App. B.1, with a curvature-aware preconditioner).

Why a probe: a confident classifier's sampled labels are its argmax but for about one example in 1 / (1 - max
probability), so full-batch sampled-label gradients are one vector plus those few examples' terms; on the demo
digits MLP (train loss 9e-4) 256 of them spanned 122-130 directions, 256 probes span 248-249 (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from kronfluence_bif.logs import logger


def double_backward() -> contextlib.AbstractContextManager:
    """The block's `scaled_dot_product_attention` calls take torch's math kernel, whose backward is itself
    differentiable: the fused kernels (flash attention on CPU, cuDNN and memory-efficient ones on CUDA) have no
    double backward, so Hessian-vector products through a Hugging Face model with its default "sdpa" attention
    fail without it. The math kernel computes the same attention, to float rounding. For the Hessian-vector
    products (Rayleigh-Ritz, the sharpness probe); the chains' steps and evaluations keep the fast kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel choice
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class CurvatureSketch:
    """F_K = basis.T @ diag(eigenvalues) @ basis over the flattened sampled weights."""

    basis: torch.Tensor  # [k, p], orthonormal rows, float32 (row-major: the fast layout for both products)
    eigenvalues: torch.Tensor  # [k], descending, > 0, float32
    ritz_rows: int = 0  # > 0: the eigenvalues are Rayleigh-Ritz values of the loss Hessian over this many examples

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())


@torch.no_grad()
def sketch_fisher(
    sampled_loss: Callable[[Any], torch.Tensor],
    batches: Sequence[Any],
    params: Sequence[torch.Tensor],
    batch_size: int,
) -> CurvatureSketch:
    """Sketch the mean per-example Fisher from one Fisher-probe gradient per batch (K = len(batches))."""
    params = list(params)
    numel = sum(p.numel() for p in params)
    rows = torch.empty(len(batches), numel, dtype=torch.float32, device=params[0].device)
    for k, batch in enumerate(batches):
        with torch.enable_grad():
            grads = torch.autograd.grad(sampled_loss(batch), params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        torch.cat([g.reshape(-1).float() for g in flat], out=rows[k])
    rows /= math.sqrt(batch_size * len(batches))
    if not bool(torch.isfinite(rows).all()):
        raise FloatingPointError(
            "The gradients used for the curvature sketch are not finite; check the Task's compute_fisher_probe "
            "or compute_train_loss(sample=True), or use BIFArguments(sampler='rmsprop_sgld')."
        )
    basis, values = _eigen_pairs(rows)
    logger.debug("Curvature sketch: rank %d of %d, top eigenvalue %.4g.", values.numel(), len(batches), values[0])
    return CurvatureSketch(basis=basis, eigenvalues=values.float().to(basis.device))


def _eigen_pairs(rows: torch.Tensor):
    """Orthonormal basis [r, p] and descending eigenvalues [r] of U^T U, decomposed on the smaller side of U [k, p]."""
    k, p = rows.shape
    if p < k:  # the p x p matrix itself (a few weights, many gradients)
        values, vectors = torch.linalg.eigh((rows.T.double() @ rows.double()).cpu())
        keep = values > values.max().clamp_min(1e-30) * 1e-8
        return vectors[:, keep].flip(1).T.to(rows), values[keep].flip(0)
    # thin SVD through the k x k Gram matrix (p >= k): U = W S V^T, so V^T = S^-1 W^T U
    values, vectors = torch.linalg.eigh((rows.double() @ rows.T.double()).cpu())
    keep = values > values.max().clamp_min(1e-30) * 1e-8
    values, vectors = values[keep].flip(0), vectors[:, keep].flip(1)
    return (vectors / values.sqrt()).T.to(rows) @ rows, values
