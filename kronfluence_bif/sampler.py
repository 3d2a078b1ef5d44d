"""SGLD and RMSprop-SGLD steps over a list of fp32 parameter tensors, with `_foreach` math.

One step (Welling & Teh 2011; paper, Algorithm 1)::

    w <- w - eps/2 * G * (nbeta/m * sum_batch grad loss_k(w) + gamma * (w - w*)) + sqrt(eps * G) * xi

G = 1 for SGLD. RMSprop-SGLD (Li et al. 2016) uses G = 1 / (rmsprop_eps + sqrt(V)) with V an EMA of the squared
loss drift (the localization term is excluded from V). With a frozen G the chain targets the same posterior
exactly; an adapting G biases it (sgld-notes.md), hence `freeze()` after burn-in.

Sketch-SGLD uses the full (non-diagonal) G = (nbeta F_K + gamma I)^-1 with F_K a low-rank Fisher sketch at w*
(`curvature.py`). G is fixed, so the chain targets the same posterior exactly; with G ~ (Hessian of the potential)^-1
every direction relaxes in ~1/eps steps, and eps is dimensionless (stable for eps * lambda_max(G A) < 4).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from kronfluence_bif.curvature import CurvatureSketch


class SGLD:
    """Plain SGLD on `params` (updated in place), localized at `anchors`."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generator: torch.Generator,
    ) -> None:
        self.params = list(params)
        self.anchors = list(anchors)
        self.step_size = float(step_size)
        self.nbeta = float(nbeta)
        self.localization = float(localization)
        self.generator = generator
        numel = sum(p.numel() for p in self.params)
        device, dtype = self.params[0].device, self.params[0].dtype
        self._noise_flat = torch.empty(numel, device=device, dtype=dtype)
        self._noise = _split_like(self._noise_flat, self.params)
        self.num_steps = 0
        # when set, each step records the norms of its loss-gradient, localization and noise moves (diagnostics)
        self.track_norms = False
        self.last_norms: Optional[torch.Tensor] = None

    def _loss_drift(self, grads: Sequence[torch.Tensor], batch_size: int) -> List[torch.Tensor]:
        """nbeta/m * sum of per-example gradients, in the parameters' dtype."""
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, self.params)]
        return torch._foreach_mul(grads, self.nbeta / batch_size)

    def _offset(self) -> Optional[List[torch.Tensor]]:
        """w - w*, computed once per step when the localization or the norm tracking needs it."""
        if self.localization != 0.0 or self.track_norms:
            return torch._foreach_sub(self.params, self.anchors)
        return None

    def _add_localization(self, drift: List[torch.Tensor], diff: Optional[List[torch.Tensor]]) -> None:
        if self.localization != 0.0:
            torch._foreach_add_(drift, diff, alpha=self.localization)

    def _sample_noise(self) -> List[torch.Tensor]:
        self._noise_flat.normal_(generator=self.generator)
        return self._noise

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], batch_size: int) -> None:
        drift = self._loss_drift(grads, batch_size)
        diff = self._offset()
        norms = self._term_norms(drift, diff, None) if self.track_norms else None
        self._add_localization(drift, diff)
        torch._foreach_add_(self.params, drift, alpha=-0.5 * self.step_size)
        noise = self._sample_noise()
        torch._foreach_add_(self.params, noise, alpha=math.sqrt(self.step_size))
        if norms is not None:
            self.last_norms = torch.stack([*norms, math.sqrt(self.step_size) * _global_norm(noise)])
        self.num_steps += 1

    def _term_norms(
        self, loss_drift: List[torch.Tensor], diff: List[torch.Tensor], precond: Optional[List[torch.Tensor]]
    ):
        """Norms of this step's loss-gradient and localization moves (before they are added)."""
        half = 0.5 * self.step_size
        if precond is not None:  # out of place: `diff` is still needed unscaled by the localization
            loss_drift = torch._foreach_mul(loss_drift, precond)
            diff = torch._foreach_mul(diff, precond)
        return half * _global_norm(loss_drift), half * self.localization * _global_norm(diff)

    def freeze(self) -> None:
        """Nothing adapts in plain SGLD."""

    @property
    def preconditioner(self) -> Optional[List[torch.Tensor]]:
        """The diagonal preconditioner G of the next step; None for plain SGLD (G = 1)."""
        return None

    @property
    def apply_root(self) -> Optional[Callable[[List[torch.Tensor]], List[torch.Tensor]]]:
        """v -> G^1/2 v for the next step (diagnostics); None when G = 1."""
        precond = self.preconditioner
        if precond is None:
            return None
        root = torch._foreach_sqrt(precond)
        return lambda v: torch._foreach_mul(v, root)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What a resumed chain needs besides the weights: the step count and the noise generator."""
        return {"num_steps": torch.tensor([self.num_steps]), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.num_steps = int(state["num_steps"][0])
        self.generator.set_state(state["generator"])


class RMSpropSGLD(SGLD):
    """Preconditioned SGLD; `freeze()` stops adapting the preconditioner (call it after burn-in)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generator: torch.Generator,
        alpha: float = 0.99,
        eps: float = 0.1,
    ) -> None:
        super().__init__(params, anchors, step_size, nbeta, localization, generator)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.square_avg = [torch.zeros_like(p) for p in self.params]
        self.frozen = False
        self._precond: Optional[List[torch.Tensor]] = None
        self._noise_scale: Optional[List[torch.Tensor]] = None

    def _preconditioner(self) -> List[torch.Tensor]:
        root = torch._foreach_sqrt(self.square_avg)
        torch._foreach_add_(root, self.eps)
        return torch._foreach_reciprocal(root)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], batch_size: int) -> None:
        drift = self._loss_drift(grads, batch_size)
        if self.frozen:
            precond, noise_scale = self._precond, self._noise_scale
        else:
            torch._foreach_mul_(self.square_avg, self.alpha)
            torch._foreach_addcmul_(self.square_avg, drift, drift, value=1.0 - self.alpha)
            precond = self._preconditioner()
            noise_scale = torch._foreach_sqrt(precond)
        diff = self._offset()
        norms = self._term_norms(drift, diff, precond) if self.track_norms else None
        self._add_localization(drift, diff)
        torch._foreach_mul_(drift, precond)
        torch._foreach_add_(self.params, drift, alpha=-0.5 * self.step_size)
        noise = torch._foreach_mul(self._sample_noise(), noise_scale)
        torch._foreach_add_(self.params, noise, alpha=math.sqrt(self.step_size))
        if norms is not None:
            self.last_norms = torch.stack([*norms, math.sqrt(self.step_size) * _global_norm(noise)])
        self.num_steps += 1

    @property
    def preconditioner(self) -> Optional[List[torch.Tensor]]:
        return self._precond if self.frozen else self._preconditioner()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = super().state_dict()
        state["frozen"] = torch.tensor([int(self.frozen)])
        state.update({f"square_avg.{i}": v for i, v in enumerate(self.square_avg)})
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for i, v in enumerate(self.square_avg):
                v.copy_(state[f"square_avg.{i}"])
        self.frozen = False
        if int(state["frozen"][0]):
            self.freeze()

    def freeze(self) -> None:
        self.frozen = True
        self._precond = self._preconditioner()
        self._noise_scale = torch._foreach_sqrt(self._precond)


class SketchSGLD(SGLD):
    """SGLD preconditioned by G = (nbeta F_K + gamma I)^-1, F_K = V diag(s) V^T a fixed curvature sketch.

    `basis` holds V^T [k, p] (row-major: both products below read it contiguously).

    G v = (v - V (c * V^T v)) / gamma and G^1/2 v = (v - V (r * V^T v)) / sqrt(gamma), with c = nbeta s /
    (nbeta s + gamma) and r = 1 - sqrt(1 - c): one [p, k] GEMM for the drift, the localization and the noise
    together, and one back. Needs gamma > 0 (G is 1 / gamma outside the sketch).
    """

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
        device, dtype = self.params[0].device, self.params[0].dtype
        numel = self._noise_flat.numel()
        self._columns = torch.empty(3, numel, device=device, dtype=dtype)  # loss drift, w - w*, noise
        self._drift_views = _split_like(self._columns[0], self.params)
        self._diff_views = _split_like(self._columns[1], self.params)
        self._noise_flat = self._columns[2]
        self._noise = _split_like(self._noise_flat, self.params)

    def _project_out(self, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows v -> v - V (weights * V^T v), for a [j, p] stack of vectors."""
        return vectors - (vectors @ self.basis.T * weights) @ self.basis

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], batch_size: int) -> None:
        eps, gamma = self.step_size, self.localization
        cols = self._columns
        torch._foreach_copy_(self._drift_views, grads)
        cols[0].mul_(self.nbeta / batch_size)
        torch._foreach_copy_(self._diff_views, self.params)
        torch._foreach_sub_(self._diff_views, self.anchors)
        self._sample_noise()
        coef = (self.basis @ cols.T).T  # [3, k]: the only pass over the basis besides the update's
        if self.track_norms:
            self.last_norms = self._move_norms(coef)
        # w <- w - eps/2 G (drift + gamma diff) + sqrt(eps) G^1/2 xi, both corrections in one [p, k] GEMV
        correction = (0.5 * eps / gamma) * self.keep * (coef[0] + gamma * coef[1])
        correction -= math.sqrt(eps / gamma) * self.root_keep * coef[2]
        update = torch.add(cols[0], cols[1], alpha=gamma).mul_(-0.5 * eps / gamma)
        update.add_(cols[2], alpha=math.sqrt(eps / gamma)).addmv_(self.basis.T, correction)
        torch._foreach_add_(self.params, _split_like(update, self.params))
        self.num_steps += 1

    def _move_norms(self, coef: torch.Tensor) -> torch.Tensor:
        """|eps/2 G drift|, |eps/2 gamma G diff|, |sqrt(eps) G^1/2 xi| from the columns' norms and coefficients.

        With V orthonormal, |v - V (w * V^T v)|^2 = |v|^2 - sum (2w - w^2) (V^T v)^2: no extra pass over V.
        """
        eps, gamma = self.step_size, self.localization
        weights = torch.stack([self.keep, self.keep, self.root_keep])
        squares = torch.linalg.vector_norm(self._columns, dim=1).square()
        squares = (squares - ((2 * weights - weights.square()) * coef.square()).sum(1)).clamp_min(0.0)
        scale = [0.5 * eps / gamma, 0.5 * eps, math.sqrt(eps / gamma)]
        return squares.sqrt() * torch.tensor(scale, dtype=squares.dtype, device=squares.device)

    @property
    def apply_root(self) -> Callable[[List[torch.Tensor]], List[torch.Tensor]]:
        def root(v: List[torch.Tensor]) -> List[torch.Tensor]:
            flat = torch.cat([t.reshape(-1) for t in v])[None]
            return _split_like(self._project_out(flat, self.root_keep)[0] / math.sqrt(self.localization), v)

        return root


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over a list of tensors, as a 0-dim tensor on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def _split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views
