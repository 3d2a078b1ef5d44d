"""The linear control variate: each value's linear part on the sampled span, its covariance taken exactly.

A chain of a sampler that moves on a fixed span (`Sampler.linear_span`: w = w* + V^T c) samples, where its
potential is quadratic on the span, c ~ N(0, diag(variance)). Each evaluated value (a train loss x_i, a query
measurement y_j) is x_i(w* + V^T c) = x_i(w*) + J_i c + r_i(c), with J its Jacobian on the span. The BIF's
leading term is then J_y diag(variance) J_x^T, known in closed form, and only the rest needs the draws:

    Cov_hat(x, y) - J_y C_hat J_x^T + J_y diag(variance) J_x^T,     C_hat = the draws' covariance of c,

which removes the Monte-Carlo error of the leading term (on the demo UCI MLP, LDS 0.322 -> 0.346 at 1600 draws,
and 0.25 -> 0.31 at 400; BENCHMARKS.md, "The linear control variate"). Its expectation is the chain's covariance
with the linear part's taken under the quadratic posterior: exact where the potential is quadratic on the span.

J comes from central secants at w* +- one posterior standard deviation along each direction: 2k evaluations
through the run's own `Evaluator` (its views, shards and reductions, so J matches the accumulated values column for
column; any model, no forward-mode autodiff needed), the slope averaged over where the draws are. The correction
is added to the pooled moments (`CrossMoments.add_covariance_`), so covariance, correlation and column blocks read
it like any other sums.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Tuple

import torch

from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.samplers import LinearSpan
from kronfluence_bif.samplers.base import split_like

if TYPE_CHECKING:
    from kronfluence_bif.engine.chain import RunState
    from kronfluence_bif.engine.engine import SamplingEngine

SECANT_BLOCK_BYTES = 64 << 20  # evaluated rows per block of secants: at most this many bytes of float32 values


class LinearControlVariate:
    """J_x [dim_x, k] and J_y [dim_y, k] on a span with coordinate variances [k]; `apply_` corrects pooled moments."""

    def __init__(self, jacobian_x: torch.Tensor, jacobian_y: torch.Tensor, variance: torch.Tensor) -> None:
        if jacobian_x.shape[1] != variance.numel() or jacobian_y.shape[1] != variance.numel():
            raise ValueError(
                f"Jacobians {tuple(jacobian_x.shape)}, {tuple(jacobian_y.shape)} do not match {variance.numel()} "
                "span directions."
            )
        self.jacobian_x = jacobian_x.double()
        self.jacobian_y = jacobian_y.double()
        self.variance = variance.double().to(self.jacobian_x.device)

    @classmethod
    @torch.no_grad()
    def by_secants(cls, engine: SamplingEngine, run: RunState, span: LinearSpan) -> LinearControlVariate:
        """J of every accumulated column (all columns: a member of an evaluation group gets its partners' through
        the same exchange as the draws) by central secants at w* +- sqrt(variance_j) along each direction j."""
        weights, evaluator, lay = engine.weights, engine.evaluator, run.layout
        full = dataclasses.replace(lay, own=None)
        steps = span.variance.sqrt()
        per_block = max(1, SECANT_BLOCK_BYTES // (8 * max(lay.width, 1)))
        blocks_x, blocks_y = [], []
        try:
            for start in range(0, span.rank, per_block):
                block = torch.empty(2 * min(per_block, span.rank - start), lay.width, device=run.buffer.device)
                for i, j in enumerate(range(start, start + block.shape[0] // 2)):
                    for side, sign in ((0, 1.0), (1, -1.0)):
                        _move_to(weights, span.basis[j], sign * float(steps[j]))
                        evaluator.evaluate(block[2 * i + side], lay.mine)
                engine.state.all_gather_columns(block, lay.gather_columns, run.plan.group_ranks)
                x, y = evaluator.centered(block, run.shift, full, engine.diagonal)
                scale = 2.0 * steps[start : start + block.shape[0] // 2, None].to(x)
                blocks_x.append(((x[0::2] - x[1::2]) / scale).T)
                blocks_y.append(((y[0::2] - y[1::2]) / scale).T)
        finally:
            weights.reset()
        return cls(torch.cat(blocks_x, 1), torch.cat(blocks_y, 1), span.variance)

    def correction(self, coordinates: CrossMoments, diagonal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(delta_xy, delta_xx, delta_yy): J (diag(variance) - C_hat) J^T for the cross covariance ([dim_y, dim_x],
        or [dim] when diagonal) and the two sides' variances, C_hat the draws' covariance of the coordinates."""
        gap = torch.diag(self.variance) - coordinates.covariance().to(self.variance)
        gap = (gap + gap.T) / 2
        jx_gap, jy_gap = self.jacobian_x @ gap, self.jacobian_y @ gap
        delta_xx = (jx_gap * self.jacobian_x).sum(1)
        delta_yy = (jy_gap * self.jacobian_y).sum(1)
        delta_xy = (jx_gap * self.jacobian_y).sum(1) if diagonal else jy_gap @ self.jacobian_x.T
        return delta_xy, delta_xx, delta_yy

    def apply_(self, moments: CrossMoments) -> None:
        """Correct pooled moments (over every chain and process) in place; their coordinate sums are consumed."""
        if moments.coordinates is None:
            raise ValueError("The linear control variate needs moments that kept the draws' span coordinates.")
        moments.add_covariance_(*self.correction(moments.coordinates, moments.diagonal))
        moments.coordinates = None


def _move_to(weights, direction: torch.Tensor, distance: float) -> None:
    """The sampled weights at w* + distance x direction (flattened over them)."""
    weights.reset()
    torch._foreach_add_(weights.masters, split_like(direction * distance, weights.masters))
    weights.sync()
