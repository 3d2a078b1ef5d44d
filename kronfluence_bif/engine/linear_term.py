"""The linear control variate: each value's linear part on the sampled span, its covariance taken exactly.

A chain of a sampler that moves on a fixed span (`Sampler.linear_span`: w = w* + V^T c) samples, where its
potential is quadratic on the span, c ~ N(0, diag(variance)). Each evaluated value (a train loss x_i, a query
measurement y_j) is x_i(w* + V^T c) = x_i(w*) + J_i c + r_i(c), with J its Jacobian on the span. The BIF's
leading term is then J_y diag(variance) J_x^T, known in closed form, and only the rest needs the draws:

    Cov_hat(x, y) - J_y C_hat J_x^T + J_y diag(variance) J_x^T,     C_hat = the draws' covariance of c,

which removes the Monte-Carlo error of the leading term (on the demo UCI MLP, LDS 0.322 -> 0.346 at 1600 draws,
and 0.25 -> 0.31 at 400; BENCHMARKS.md, "The linear control variate"). Its expectation is the chain's covariance
with the linear part's taken under the quadratic posterior: exact where the potential is quadratic on the span.

J comes from central secants at w* +- sqrt(3) posterior standard deviations along each direction: 2k evaluations
(split over the processes' chain groups, the Jacobians then summed) through the run's own `Evaluator` (its views,
shards and reductions, so J matches the accumulated values column for column; any model, no forward-mode autodiff
needed). Any J leaves the estimate's expectation unchanged; the variance is least for the draws' regression slope
of each value on c_j, which for c_j ~ N(0, s^2) is E[f'(c_j)] = E[c_j f(c_j)] / s^2 (Stein's lemma), and the
three-point Gauss-Hermite rule for it (nodes 0, +-sqrt(3) s) is exactly this secant: exact for values polynomial
to fourth order along c_j, where the secant at +-s is exact to second order only. On the demo digits MLP (three
seeds, 4 x 100 draws) the wider secant lifts LDS by 0.003 / 0.002 at retrain fractions 0.5 / 0.1; UCI, nearly
linear along its span, does not move. The correction
is added to the pooled moments (`CrossMoments.add_covariance_`), so covariance, correlation and column blocks read
it like any other sums.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.samplers import LinearSpan
from kronfluence_bif.samplers.base import split_like

if TYPE_CHECKING:
    from kronfluence_bif.engine.chain import RunState
    from kronfluence_bif.engine.engine import SamplingEngine

SECANT_BLOCK_BYTES = 64 << 20  # evaluated rows per block of secants: at most this many bytes of float32 values
SECANT_WIDTH = 3.0**0.5  # secants at w* +- sqrt(3) posterior standard deviations (module docstring)


class LinearControlVariate:
    """J_x [dim_x, k] and J_y [dim_y, k] (the same tensor for self scores) on a span with coordinate variances [k];
    `apply_` corrects pooled moments."""

    def __init__(self, jacobian_x: torch.Tensor, jacobian_y: torch.Tensor, variance: torch.Tensor) -> None:
        if jacobian_x.shape[1] != variance.numel() or jacobian_y.shape[1] != variance.numel():
            raise ValueError(
                f"Jacobians {tuple(jacobian_x.shape)}, {tuple(jacobian_y.shape)} do not match {variance.numel()} "
                "span directions."
            )
        self.jacobian_x = jacobian_x.double()
        self.jacobian_y = self.jacobian_x if jacobian_y is jacobian_x else jacobian_y.double()
        self.variance = variance.double().to(self.jacobian_x.device)

    @classmethod
    @torch.no_grad()
    def by_secants(cls, engine: SamplingEngine, run: RunState, span: LinearSpan) -> Optional[LinearControlVariate]:
        """J of every accumulated column by central secants at w* +- sqrt(3 variance_j) along each direction j; None
        where a value there is not finite. Collective: the directions are split over the evaluation groups (each
        group's members evaluate theirs together, partners' columns through the same exchange as the draws) and
        the Jacobians summed over processes, so every process holds all of J for a share of the evaluations."""
        plan = run.plan
        mine = list(range(plan.group, span.rank, plan.num_groups))  # this group's directions
        part_x, part_y = _secant_columns(engine, run, span, mine)
        jacobian_x = _spread(part_x, mine, span.rank, plan.is_group_leader)
        jacobian_y = jacobian_x if engine.y is None else _spread(part_y, mine, span.rank, plan.is_group_leader)
        engine.state.all_reduce_sum_([jacobian_x] if engine.y is None else [jacobian_x, jacobian_y])
        if not (bool(torch.isfinite(jacobian_x).all()) and bool(torch.isfinite(jacobian_y).all())):
            return None
        return cls(jacobian_x, jacobian_y, span.variance)

    def apply_(self, moments: CrossMoments) -> float:
        """Correct pooled moments (over every chain and process) in place by J (diag(variance) - C_hat) J^T, C_hat
        the draws' covariance of the span coordinates (their sums are consumed). Returns the mean over directions of
        C_hat_jj / variance_j: 1 where the chains sample the quadratic posterior on the span."""
        if moments.coordinates is None:
            raise ValueError("The linear control variate needs moments that kept the draws' span coordinates.")
        drawn = moments.coordinates.covariance().to(self.variance)
        gap = torch.diag(self.variance) - (drawn + drawn.T) / 2
        jx_gap = self.jacobian_x @ gap
        jy_gap = jx_gap if self.jacobian_y is self.jacobian_x else self.jacobian_y @ gap
        delta_xx = (jx_gap * self.jacobian_x).sum(1)
        delta_yy = delta_xx if jy_gap is jx_gap else (jy_gap * self.jacobian_y).sum(1)
        if moments.diagonal:
            moments.add_covariance_((jx_gap * self.jacobian_y).sum(1), delta_xx, delta_yy)
        else:  # the [dim_y, dim_x] shift as a product of its [*, k] factors: no temporary of the moments' size
            moments.add_covariance_((jy_gap, self.jacobian_x), delta_xx, delta_yy)
        moments.coordinates = None
        return float((drawn.diagonal() / self.variance).mean())


def _secant_columns(
    engine: SamplingEngine, run: RunState, span: LinearSpan, directions: List[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(J_x, J_y) columns [dim, len(directions)] of `directions` (J_y is J_x for self scores), in blocks of rows."""
    lay = run.layout
    full = dataclasses.replace(lay, own=None)  # every column: partners' arrive through the exchange
    steps = span.variance.sqrt() * SECANT_WIDTH
    per_block = max(1, SECANT_BLOCK_BYTES // (8 * max(lay.width, 1)))
    xs, ys = [], []
    try:
        for start in range(0, len(directions), per_block):
            chosen = directions[start : start + per_block]
            block = _evaluate_secants(engine, run, span, chosen, steps)
            x, y = engine.evaluator.centered(block, run.shift, full, engine.diagonal)
            scale = 2.0 * steps[chosen].to(x)[:, None]
            xs.append(((x[0::2] - x[1::2]) / scale).T)
            ys.append(((y[0::2] - y[1::2]) / scale).T)
    finally:
        engine.weights.reset()
    f64 = {"dtype": torch.float64, "device": run.buffer.device}
    part_x = torch.cat(xs, 1) if xs else torch.zeros(lay.dim_x, 0, **f64)
    if engine.y is None:
        return part_x, part_x
    return part_x, torch.cat(ys, 1) if ys else torch.zeros(lay.dim_y, 0, **f64)


def _spread(part: torch.Tensor, directions: List[int], rank: int, counted: bool) -> torch.Tensor:
    """[dim, rank] float64 holding `part`'s columns at `directions` (zeros elsewhere, and everywhere unless
    `counted`: one member per group contributes, so the sum over processes has each column once)."""
    out = torch.zeros(part.shape[0], rank, dtype=torch.float64, device=part.device)
    if counted and directions:
        out[:, directions] = part.double()
    return out


def _evaluate_secants(
    engine: SamplingEngine, run: RunState, span: LinearSpan, directions: List[int], steps: torch.Tensor
) -> torch.Tensor:
    """[2 len(directions), width]: the evaluated rows at w* + and - steps_j along each direction j (this process's
    batches, then the group's exchange); an error on one member is raised on every member first."""
    lay, plan = run.layout, run.plan
    block = torch.empty(2 * len(directions), lay.width, device=run.buffer.device)
    error: Optional[BaseException] = None
    try:
        for i, j in enumerate(directions):
            for side, sign in ((0, 1.0), (1, -1.0)):
                _move_to(engine.weights, span.basis[j], sign * float(steps[j]))
                engine.evaluator.evaluate(block[2 * i + side], lay.mine)
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every member of the group
        error = exc
    if plan.num_shards > 1:
        reports = engine.state.group_all_gather_object(None if error is None else repr(error), plan.group_ranks)
        if error is None and any(r is not None for r in reports):
            raise RuntimeError(f"The linear control variate's secants failed on a member of this group: {reports}")
    if error is not None:
        raise error
    engine.state.all_gather_columns(block, lay.gather_columns, plan.group_ranks)
    return block


def _move_to(weights, direction: torch.Tensor, distance: float) -> None:
    """The sampled weights at w* + distance x direction (flattened over them)."""
    weights.reset()
    torch._foreach_add_(weights.masters, split_like(direction * distance, weights.masters))
    weights.sync()
