"""Streaming shifted cross-moments in float64: covariance or correlation without storing traces.

Values are shifted by their value at w* before accumulation, so E[xy] - E[x]E[y] does not lose digits to
cancellation. A block of draws updates the cross sum with one GEMM. Chains and processes merge by adding sums:
`place_owned` puts the columns one member of an evaluation group accumulated into the full sums, and
`all_reduce_moments_` adds the sums of every process. A chain that moves on a span also keeps the moments of its
span coordinates over the same draws (`coordinates`), which the linear control variate needs
(`engine/linear_term.py`); they pool the same way.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

SUM_NAMES = ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")
COORDINATES = "coordinates"  # state_dict prefix of the span coordinates' sums


class CrossMoments:
    """Sums over draws of x [dim_x], y [dim_y] and their products: full y x^T, or elementwise when `diagonal`."""

    def __init__(
        self,
        dim_x: int,
        dim_y: int,
        diagonal: bool = False,
        device: Optional[torch.device] = None,
        coordinates: int = 0,
    ) -> None:
        """`coordinates` > 0: also the sums of that many span coordinates per draw and of their outer products."""
        if diagonal and dim_x != dim_y:
            raise ValueError(f"diagonal moments need dim_x == dim_y, got {dim_x} and {dim_y}.")
        kw = {"dtype": torch.float64, "device": device}
        self.diagonal = diagonal
        self.count = 0
        self.sum_x = torch.zeros(dim_x, **kw)
        self.sum_y = torch.zeros(dim_y, **kw)
        self.sum_xx = torch.zeros(dim_x, **kw)
        self.sum_yy = torch.zeros(dim_y, **kw)
        self.sum_xy = torch.zeros(dim_x, **kw) if diagonal else torch.zeros(dim_y, dim_x, **kw)
        # the chain's span coordinates c over the same draws, as moments of (c, c): None without a span
        self.coordinates = CrossMoments(coordinates, coordinates, device=device) if coordinates else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, coordinates: Optional[torch.Tensor] = None) -> None:
        """Add a block of draws: x [k, dim_x], y [k, dim_y] (already shifted), and their span coordinates [k, r]
        when these moments keep them."""
        if (coordinates is None) != (self.coordinates is None):
            raise ValueError("update needs the draws' span coordinates exactly when the moments keep them.")
        if coordinates is not None:
            self.coordinates.update(coordinates, coordinates)
        x = x.to(self.sum_x.device, torch.float64)
        y = y.to(self.sum_y.device, torch.float64)
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"update expects x [k, dim_x] and y [k, dim_y], got {tuple(x.shape)}, {tuple(y.shape)}.")
        self.count += int(x.shape[0])
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sum_xx += (x * x).sum(0)
        self.sum_yy += (y * y).sum(0)
        if self.diagonal:
            self.sum_xy += (x * y).sum(0)
        else:
            self.sum_xy.addmm_(y.T, x)

    def merge_(self, other: CrossMoments) -> CrossMoments:
        """Pool another set of draws (another chain or process) into this one."""
        self.count += other.count
        for name in ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy"):
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        if (self.coordinates is None) != (other.coordinates is None):
            raise ValueError("Cannot pool moments with span coordinates and moments without.")
        if self.coordinates is not None:
            self.coordinates.merge_(other.coordinates)
        return self

    @torch.no_grad()
    def add_covariance_(
        self,
        delta_xy: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        delta_xx: torch.Tensor,
        delta_yy: torch.Tensor,
    ) -> None:
        """Shift the covariance these sums give by `delta_xy` ([dim_y, dim_x], or [dim] when diagonal; or factors
        (left [dim_y, r], right [dim_x, r]) of left right^T) and the variances by `delta_xx`, `delta_yy` (a
        correction known in closed form, e.g. the linear control variate's)."""
        self._check_count()
        scale = float(self.count - 1)
        if isinstance(delta_xy, tuple):
            left, right = delta_xy
            self.sum_xy.addmm_(left.to(self.sum_xy), right.to(self.sum_xy).T, alpha=scale)
        else:
            self.sum_xy.add_(delta_xy.to(self.sum_xy), alpha=scale)
        self.sum_xx.add_(delta_xx.to(self.sum_xx), alpha=scale)
        self.sum_yy.add_(delta_yy.to(self.sum_yy), alpha=scale)

    # ------------------------------------------------------------------ results
    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 draws, got {self.count}.")

    def variance_x(self) -> torch.Tensor:
        self._check_count()
        return ((self.sum_xx - self.sum_x * self.sum_x / self.count) / (self.count - 1)).clamp_min(0.0)

    def variance_y(self) -> torch.Tensor:
        self._check_count()
        return ((self.sum_yy - self.sum_y * self.sum_y / self.count) / (self.count - 1)).clamp_min(0.0)

    def covariance(self) -> torch.Tensor:
        """Sample covariance with 1/(N-1): [dim_y, dim_x], or [dim] when diagonal."""
        self._check_count()
        if self.diagonal:
            outer = self.sum_y * self.sum_x
        else:
            outer = torch.outer(self.sum_y, self.sum_x)
        return (self.sum_xy - outer / self.count) / (self.count - 1)

    def correlation(self) -> torch.Tensor:
        """Pearson correlation in [-1, 1]; 0 where a trace is constant."""
        cov = self.covariance()
        var_x, var_y = self.variance_x(), self.variance_y()
        scale = var_y * var_x if self.diagonal else torch.outer(var_y, var_x)
        scale = scale.sqrt()
        corr = torch.where(scale > 0, cov / scale.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(cov))
        return corr.clamp_(-1.0, 1.0)

    # ------------------------------------------------------------------ (de)serialization for resume
    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "diagonal": torch.tensor([int(self.diagonal)], dtype=torch.int64),
            **{name: getattr(self, name).cpu() for name in SUM_NAMES},
        }
        if self.coordinates is not None:  # their own state, under a prefix
            state.update({f"{COORDINATES}.{k}": v for k, v in self.coordinates.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor], device: Optional[torch.device] = None) -> CrossMoments:
        moments = cls(state["sum_x"].numel(), state["sum_y"].numel(), bool(int(state["diagonal"][0])), device)
        moments.count = int(state["count"][0])
        for name in SUM_NAMES:
            getattr(moments, name).copy_(state[name])
        prefix = f"{COORDINATES}."
        nested = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if nested:
            moments.coordinates = cls.from_state_dict(nested, device)
        return moments


def place_owned(part: CrossMoments, own: torch.Tensor, dim_x: int, dim_y: int, with_y: bool) -> CrossMoments:
    """Full-size moments [dim_x] x [dim_y] holding the output columns `own` that `part` accumulated, zero elsewhere.

    With full (not diagonal) moments every member of a group accumulates all of y, so only one (`with_y`, the
    group's leader) contributes y's sums: after the all-reduce each draw's y is counted once.
    """
    rank = 0 if part.coordinates is None else part.coordinates.sum_x.numel()
    full = CrossMoments(dim_x, dim_y, diagonal=part.diagonal, device=part.sum_x.device, coordinates=rank)
    full.sum_x[own] = part.sum_x
    full.sum_xx[own] = part.sum_xx
    if part.diagonal:
        for name in ("sum_y", "sum_yy", "sum_xy"):
            getattr(full, name)[own] = getattr(part, name)
    else:
        full.sum_xy[:, own] = part.sum_xy
        if with_y:
            full.sum_y.copy_(part.sum_y)
            full.sum_yy.copy_(part.sum_yy)
    if full.coordinates is not None and with_y:  # every member tracks the same chain: the leader counts it
        full.coordinates.merge_(part.coordinates)
    full.count = part.count
    return full


def all_reduce_moments_(
    moments: CrossMoments,
    reduce_sum_: Callable[[Sequence[torch.Tensor]], None],
    extra: Sequence[torch.Tensor] = (),
    counted: bool = True,
) -> None:
    """Sum `moments` (and `extra` tensors) over processes in place with `reduce_sum_` (an all-reduce of a list);
    a process whose draws another one counts already passes `counted=False`."""
    count = torch.tensor([moments.count if counted else 0], dtype=torch.float64)
    sums = [getattr(moments, name) for name in SUM_NAMES]
    if moments.coordinates is not None:
        sums += [getattr(moments.coordinates, name) for name in SUM_NAMES]
    reduce_sum_([count, *sums, *extra])
    moments.count = int(count.item())
    if moments.coordinates is not None:
        moments.coordinates.count = moments.count
