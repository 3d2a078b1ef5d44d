"""RMSprop-SGLD (Li et al. 2016): a diagonal G = 1 / (rmsprop_eps + sqrt(V)), V an EMA of the squared loss drift.

The localization term is excluded from V. With a frozen G the chain targets the same posterior exactly; an
adapting G biases it (sgld-notes.md), hence `freeze()` after burn-in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import torch

from kronfluence_bif.logs import warn_once
from kronfluence_bif.samplers.base import (
    Sampler,
    SamplerContext,
    Vectors,
    check_localization_limit,
    register_sampler,
)

if TYPE_CHECKING:
    from kronfluence_bif.arguments import BIFArguments


@register_sampler("rmsprop_sgld")
class RMSpropSGLD(Sampler):
    """Preconditioned SGLD; `freeze()` stops adapting the preconditioner (call it after burn-in)."""

    default_step_size = 3e-4

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
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r} (the EMA decay must be in (0, 1)).")
        if not float(eps) > 0.0:
            raise ValueError(f"Invalid eps: {eps!r} (must be > 0: G is at most 1 / eps).")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.square_avg = [torch.zeros_like(p) for p in self.params]
        self.frozen = False
        self._precond: Optional[Vectors] = None
        self._noise_scale: Optional[Vectors] = None

    @classmethod
    def check_arguments(cls, args: BIFArguments) -> None:
        """G starts at 1 / rmsprop_eps (V = 0), so that bounds the localization term's step."""
        check_localization_limit(
            args, 1.0 / float(args.rmsprop_eps), label=" / rmsprop_eps", fix=" or raise `rmsprop_eps`."
        )

    @classmethod
    def build(
        cls, params: Vectors, anchors: Vectors, args: BIFArguments, generator: torch.Generator, context: SamplerContext
    ) -> RMSpropSGLD:
        if args.num_burnin_steps == 0:
            warn_once(
                "rmsprop-no-burnin",
                "RMSprop-SGLD with num_burnin_steps=0: its preconditioner starts from V=0 (the largest steps), "
                "so early draws are biased. Set num_burnin_steps > 0 (the default is 100).",
            )
        return cls(
            params,
            anchors,
            args.step_size,
            args.nbeta,
            args.localization,
            generator,
            alpha=args.rmsprop_alpha,
            eps=args.rmsprop_eps,
        )

    def _preconditioner(self) -> Vectors:
        root = torch._foreach_sqrt(self.square_avg)
        torch._foreach_add_(root, self.eps)
        return torch._foreach_reciprocal(root)

    def _adapt(self, drift: Vectors) -> None:
        if not self.frozen:
            torch._foreach_mul_(self.square_avg, self.alpha)
            torch._foreach_addcmul_(self.square_avg, drift, drift, value=1.0 - self.alpha)

    def _diagonal(self) -> Tuple[Optional[Vectors], Optional[Vectors]]:
        if self.frozen:
            return self._precond, self._noise_scale
        precond = self._preconditioner()
        return precond, torch._foreach_sqrt(precond)

    @property
    def preconditioner(self) -> Optional[Vectors]:
        return self._precond if self.frozen else self._preconditioner()

    def freeze(self) -> None:
        self.frozen = True
        self._precond = self._preconditioner()
        self._noise_scale = torch._foreach_sqrt(self._precond)

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
