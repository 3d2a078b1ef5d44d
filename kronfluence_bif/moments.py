"""Streaming shifted cross-moments in float64: covariance or correlation without storing traces.

Values are shifted by their value at w* before accumulation, so E[xy] - E[x]E[y] does not lose digits to
cancellation. A block of draws updates the cross sum with one GEMM. Chains and processes merge by adding sums:
`place_owned` puts the columns one member of an evaluation group accumulated into the full sums, and
`all_reduce_moments_` adds the sums of every process.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch


class CrossMoments:
    """Sums over draws of x [dim_x], y [dim_y] and their products: full y x^T, or elementwise when `diagonal`."""

    def __init__(self, dim_x: int, dim_y: int, diagonal: bool = False, device: Optional[torch.device] = None) -> None:
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

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a block of draws: x [k, dim_x], y [k, dim_y] (already shifted)."""
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
        return self

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
        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "diagonal": torch.tensor([int(self.diagonal)], dtype=torch.int64),
            **{name: getattr(self, name).cpu() for name in ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")},
        }

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor], device: Optional[torch.device] = None) -> CrossMoments:
        moments = cls(state["sum_x"].numel(), state["sum_y"].numel(), bool(int(state["diagonal"][0])), device)
        moments.count = int(state["count"][0])
        for name in ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy"):
            getattr(moments, name).copy_(state[name])
        return moments


SUM_NAMES = ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")


def place_owned(part: CrossMoments, own: torch.Tensor, dim_x: int, dim_y: int, with_y: bool) -> CrossMoments:
    """Full-size moments [dim_x] x [dim_y] holding the output columns `own` that `part` accumulated, zero elsewhere.

    With full (not diagonal) moments every member of a group accumulates all of y, so only one (`with_y`, the
    group's leader) contributes y's sums: after the all-reduce each draw's y is counted once.
    """
    full = CrossMoments(dim_x, dim_y, diagonal=part.diagonal, device=part.sum_x.device)
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
    reduce_sum_([count, *(getattr(moments, name) for name in SUM_NAMES), *extra])
    moments.count = int(count.item())
