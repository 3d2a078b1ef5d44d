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
    basis, values = _eigen_pairs(rows)  # raises FloatingPointError where the rows are not finite
    logger.debug("Curvature sketch: rank %d of %d, top eigenvalue %.4g.", values.numel(), len(batches), values[0])
    return CurvatureSketch(basis=basis, eigenvalues=values.float().to(basis.device))


def _eigen_pairs(rows: torch.Tensor):
    """Orthonormal basis [r, p] and descending eigenvalues [r] of U^T U, decomposed on the smaller side of U [k, p]."""
    k, p = rows.shape
    if p < k:  # the p x p matrix itself (a few weights, many gradients)
        values, vectors = torch.linalg.eigh(_finite(gram64(rows.T, rows.T)).cpu())
        keep = values > values.max().clamp_min(1e-30) * 1e-8
        return vectors[:, keep].flip(1).T.to(rows), values[keep].flip(0)
    # thin SVD through the k x k Gram matrix (p >= k): U = W S V^T, so V^T = S^-1 W^T U
    values, vectors = torch.linalg.eigh(_finite(gram64(rows, rows)).cpu())
    keep = values > values.max().clamp_min(1e-30) * 1e-8
    values, vectors = values[keep].flip(0), vectors[:, keep].flip(1)
    return (vectors / values.sqrt()).T.to(rows) @ rows, values


def _finite(gram: torch.Tensor) -> torch.Tensor:
    """`gram`, checked: a float64 Gram matrix of float32 rows is finite exactly when the rows are (no overflow)."""
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError(
            "The gradients used for the curvature sketch are not finite; check the Task's compute_fisher_probe "
            "or compute_train_loss(sample=True), or use BIFArguments(sampler='rmsprop_sgld')."
        )
    return gram


# float64 products of [k, p] matrices, a block of columns at a time, without whole float64 copies of the operands:
# for two [256, 34k] float32 matrices (the demo UCI MLP's sketch, one thread) the Gram takes 121 ms this way against
# 295 ms through two float64 copies, the rotation 125 ms against 177 ms
_BLOCK_BYTES = 4 << 20


def _column_blocks(rows: int, columns: int):
    width = max(1, _BLOCK_BYTES // (8 * max(rows, 1)))
    return (slice(j, min(j + width, columns)) for j in range(0, columns, width))


def gram64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T in float64 for a [k, p], b [l, p] (any float dtype), without a float64 copy of either."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for cols in _column_blocks(max(a.shape[0], b.shape[0]), a.shape[1]):
        out.addmm_(a[:, cols].double(), b[:, cols].double().T)
    return out


def rotate64(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """matrix @ rows in float64 for matrix [r, k], rows [k, p], returned in rows' dtype: a change of basis whose
    result stays orthonormal to float64 rounding before the final rounding to rows' dtype."""
    out = torch.empty(matrix.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
    m64 = matrix.double()
    for cols in _column_blocks(rows.shape[0], rows.shape[1]):
        out[:, cols] = m64 @ rows[:, cols].double()
    return out
