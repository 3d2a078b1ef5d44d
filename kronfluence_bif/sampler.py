"""SGLD and RMSprop-SGLD steps over a list of fp32 parameter tensors, with `_foreach` math.

One step (Welling & Teh 2011; paper, Algorithm 1)::

    w <- w - eps/2 * G * (nbeta/m * sum_batch grad loss_k(w) + gamma * (w - w*)) + sqrt(eps * G) * xi

G = 1 for SGLD. RMSprop-SGLD (Li et al. 2016) uses G = 1 / (rmsprop_eps + sqrt(V)) with V an EMA of the squared
loss drift (the localization term is excluded from V). With a frozen G the chain targets the same posterior
exactly; an adapting G biases it (sgld-notes.md), hence `freeze()` after burn-in.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch


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


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over a list of tensors, as a 0-dim tensor on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def _split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views
