"""Sketch-SGLD: SGLD preconditioned by G = (nbeta F_K + gamma I)^-1, F_K a low-rank Fisher sketch at w*.

F_K comes from `curvature.sketch_fisher` (Fisher-probe or sampled-label minibatch gradients), built once per run
and shared by the chains (`build_sketch`), then scaled up while it underestimates the curvature (`stabilize`). G is
fixed, so the chain targets the same posterior exactly; with G ~ (Hessian of the potential)^-1 every direction
relaxes in ~1/eps steps, and eps is dimensionless (stable for eps * lambda_max(G A) < 4).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch

from kronfluence_bif.curvature import CurvatureSketch, sketch_fisher
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.samplers.base import RootFn, Sampler, SamplerContext, Vectors, register_sampler, split_like

if TYPE_CHECKING:
    from kronfluence_bif.arguments import BIFArguments

SKETCH_CACHE_KEY = "sketch_sgld.sketch"


@register_sampler("sketch_sgld")
class SketchSGLD(Sampler):
    """SGLD preconditioned by G = (nbeta F_K + gamma I)^-1, F_K = V diag(s) V^T a fixed curvature sketch.

    `basis` holds V^T [k, p] (row-major: both products below read it contiguously).

    G v = (v - V (c * V^T v)) / gamma and G^1/2 v = (v - V (r * V^T v)) / sqrt(gamma), with c = nbeta s /
    (nbeta s + gamma) and r = 1 - sqrt(1 - c): one [p, k] GEMM for the drift, the localization and the noise
    together, and one back (`_move`: the base update, fused). Needs gamma > 0 (G is 1 / gamma outside the sketch).
    """

    default_step_size = 0.25  # dimensionless: G ~ the inverse curvature
    buffer_rows = 3  # loss drift, w - w*, noise

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generator: torch.Generator,
        sketch: CurvatureSketch,
    ) -> None:
        super().__init__(params, anchors, step_size, nbeta, localization, generator)
        if self.localization <= 0.0:
            raise ValueError("SketchSGLD needs localization > 0 (the preconditioner is 1/localization off the sketch).")
        self.basis = sketch.basis
        lam = self.nbeta * sketch.eigenvalues.double()
        keep = lam / (lam + self.localization)
        self.keep = keep.to(self.basis.dtype)
        self.root_keep = (1.0 - torch.sqrt(self.localization / (lam + self.localization))).to(self.basis.dtype)
        self._drift_views = split_like(self._rows[0], self.params)
        self._diff_views = split_like(self._rows[1], self.params)

    @classmethod
    def check_arguments(cls, args: BIFArguments) -> None:
        check_dimensionless(
            args,
            "sketch_sgld",
            "its preconditioner is 1/localization outside the curvature sketch",
            "it is dimensionless; typical 0.1 to 0.5",
            "the localization term alone would diverge",
        )

    @classmethod
    def build(
        cls, params: Vectors, anchors: Vectors, args: BIFArguments, generator: torch.Generator, context: SamplerContext
    ) -> SketchSGLD:
        """The chain's sampler, with the run's sketch (built on the first chain, then taken from the context)."""
        if SKETCH_CACHE_KEY not in context.cache:
            context.cache[SKETCH_CACHE_KEY] = stabilize(build_sketch(context, args), context, args)
        sketch = context.cache[SKETCH_CACHE_KEY]
        return cls(params, anchors, args.step_size, args.nbeta, args.localization, generator, sketch)

    # ------------------------------------------------------------------ the update, fused
    def _loss_drift(self, grads: Sequence[torch.Tensor], batch_size: int) -> Vectors:
        torch._foreach_copy_(self._drift_views, grads)
        self._rows[0].mul_(self.nbeta / batch_size)
        return self._drift_views

    def _offset(self) -> Vectors:
        torch._foreach_copy_(self._diff_views, self.params)
        torch._foreach_sub_(self._diff_views, self.anchors)
        return self._diff_views

    def _project_out(self, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows v -> v - V (weights * V^T v), for a [j, p] stack of vectors."""
        return vectors - (vectors @ self.basis.T * weights) @ self.basis

    def _move(self, drift: Vectors, diff: Optional[Vectors], noise: Vectors) -> None:
        """w <- w - eps/2 G (drift + gamma diff) + sqrt(eps) G^1/2 xi, both corrections in one [p, k] GEMV."""
        eps, gamma = self.step_size, self.localization
        cols = self._rows
        coef = (self.basis @ cols.T).T  # [3, k]: the only pass over the basis besides the update's
        if self.track_norms:
            self.last_norms = self._move_norms(coef)
        correction = (0.5 * eps / gamma) * self.keep * (coef[0] + gamma * coef[1])
        correction -= math.sqrt(eps / gamma) * self.root_keep * coef[2]
        update = torch.add(cols[0], cols[1], alpha=gamma).mul_(-0.5 * eps / gamma)
        update.add_(cols[2], alpha=math.sqrt(eps / gamma)).addmv_(self.basis.T, correction)
        torch._foreach_add_(self.params, split_like(update, self.params))

    def _move_norms(self, coef: torch.Tensor) -> torch.Tensor:
        """|eps/2 G drift|, |eps/2 gamma G diff|, |sqrt(eps) G^1/2 xi| from the columns' norms and coefficients.

        With V orthonormal, |v - V (w * V^T v)|^2 = |v|^2 - sum (2w - w^2) (V^T v)^2: no extra pass over V.
        """
        eps, gamma = self.step_size, self.localization
        weights = torch.stack([self.keep, self.keep, self.root_keep])
        squares = torch.linalg.vector_norm(self._rows, dim=1).square()
        squares = (squares - ((2 * weights - weights.square()) * coef.square()).sum(1)).clamp_min(0.0)
        scale = [0.5 * eps / gamma, 0.5 * eps, math.sqrt(eps / gamma)]
        return squares.sqrt() * torch.tensor(scale, dtype=squares.dtype, device=squares.device)

    @property
    def apply_root(self) -> RootFn:
        def root(v: List[torch.Tensor]) -> List[torch.Tensor]:
            flat = torch.cat([t.reshape(-1) for t in v])[None]
            return split_like(self._project_out(flat, self.root_keep)[0] / math.sqrt(self.localization), v)

        return root


# ---------------------------------------------------------------------------------------------- the sketch
def build_sketch(context: SamplerContext, args: BIFArguments) -> CurvatureSketch:
    """The Fisher sketch at w* shared by every chain (deterministic in the seed, so processes agree)."""
    stream = context.stream
    m = min(stream.batch_size, stream.n)
    rows = torch.Generator().manual_seed(context.root_seed ^ 0xC0FFEE)
    batches = [stream.source.gather(torch.randperm(stream.n, generator=rows)[:m]) for _ in range(args.sketch_rank)]
    context.weights.reset()
    devices = [context.device] if context.device.type == "cuda" else []
    ignored: List[bool] = []  # per batch: did sample=True give exactly the true-label loss?

    def sampled(batch: Any) -> torch.Tensor:
        loss = context.views.sampled_train_loss(batch, context.model)
        if all(ignored):  # one batch whose sampled loss differs settles it: no more extra forward passes
            with torch.no_grad():
                plain = context.views.summed_train_loss(batch, context.model)
            ignored.append(bool(torch.equal(loss.detach(), plain)))
        return loss

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(context.root_seed ^ 0xF15E)
        sketch = sketch_fisher(sampled, batches, context.weights.params, m)
    if all(ignored):
        # a confident classifier can sample its own labels on a few batches, but not on all K x m examples
        warn_once(
            "sketch-no-sampling",
            "The Task's compute_train_loss(sample=True) returned the true-label loss on every one of the "
            f"{len(ignored)} sketch batches, so sketch_sgld's curvature sketch is the empirical Fisher, which "
            "underestimates the curvature of a well-fitted model; the sketch is rescaled by the measured "
            "curvature. Sample targets from the model's predictive distribution when sample=True (as for "
            "kronfluence's true Fisher).",
        )
    return sketch


def stabilize(sketch: CurvatureSketch, context: SamplerContext, args: BIFArguments) -> CurvatureSketch:
    """Scale the sketch up while step_size x lambda_max(G A) > 2 on a minibatch (Hessian-vector products).

    A sketch that underestimates the curvature (a Task that ignores sample=True, a loss whose Hessian exceeds
    its Fisher) would make the chain unstable (SGLD needs step_size x lambda_max(G A) < 4; above 2 the variance
    along that direction is more than doubled). When scaling does not lower the excess, the sharp direction
    lies outside the sketch: the last scaling is undone (it would only slow the sketched directions down).
    """
    weights = context.weights
    previous: Optional[Tuple[CurvatureSketch, float]] = None
    for _ in range(4):
        probe = SketchSGLD(
            weights.masters,
            weights.anchors,
            args.step_size,
            args.nbeta,
            args.localization,
            torch.Generator(device=context.device),
            sketch,
        )
        lam = context.sharpness(probe.apply_root, args.localization)
        if lam is None:  # no double backward: keep the sketch as built
            return sketch
        excess = args.step_size * lam
        if previous is not None and excess > 0.8 * previous[1]:
            logger.info(
                "Curvature sketch: step_size x lambda_max(G A) = %.3g after scaling (%.3g before): the sharp "
                "direction is outside the sketch; raise `sketch_rank` or lower `step_size` if chains misbehave.",
                excess,
                previous[1],
            )
            return previous[0]
        if not math.isfinite(excess) or excess <= 2.0:
            return sketch
        logger.info("Curvature sketch: step_size x lambda_max(G A) = %.3g > 2; scaling the sketch up.", excess)
        previous = (sketch, excess)
        sketch = CurvatureSketch(basis=sketch.basis, eigenvalues=sketch.eigenvalues * excess)
    return sketch


def check_dimensionless(args: BIFArguments, sampler: str, why_localization: str, step: str, failure: str) -> None:
    """The limits of a sampler whose G ~ the inverse curvature: localization > 0 and a dimensionless step < 4."""
    if float(args.localization) <= 0.0:
        raise ValueError(
            f"BIFArguments.localization must be > 0 with sampler='{sampler}' ({why_localization}); use e.g. "
            "localization=1000."
        )
    if float(args.step_size) >= 4.0:
        raise ValueError(
            f"BIFArguments.step_size must be < 4 with sampler='{sampler}' ({step}), got {args.step_size!r}: {failure}."
        )
