"""Divergence guards of a run, and the curvature probe behind the sharpness diagnostic.

A chain stops with `SamplerDivergenceError` at the first non-finite minibatch loss, non-finite evaluated value,
or draw whose mean train loss passed `divergence_loss_ratio` times the larger of its value at w* and the thermal
scale num_weights / (2 nbeta) (the loss a healthy chain reaches, by equipartition). Checked once per block.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.data import MinibatchStream
from kronfluence_bif.diagnostics import preconditioned_sharpness
from kronfluence_bif.errors import SamplerDivergenceError
from kronfluence_bif.logs import logger
from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.parameters import SampledWeights


class DivergenceGuard:
    """The limits of one run (from the values at w*) and the minibatch losses checked so far."""

    def __init__(self, args: BIFArguments, shift: torch.Tensor, init_mean: float, num_weights: int) -> None:
        """`shift`: the evaluated row at w*; `init_mean`: its monitor rows' mean loss."""
        if not math.isfinite(init_mean) or not bool(torch.isfinite(shift).all()):
            raise SamplerDivergenceError(
                "The losses/measurements at the trained weights w* are not finite; BIF cannot start. "
                "Check the model and the Task."
            )
        self.args = args
        self.init_mean = init_mean
        # the loss a healthy chain reaches is about L(w*) + d / (2 nbeta) (equipartition), so the limit scales the
        # larger of the two: a model that interpolates (L(w*) ~ 0) must not trip it on its first draw
        self.scale = max(init_mean, num_weights / (2.0 * args.nbeta))
        self.limit = args.divergence_loss_ratio * self.scale if self.scale > 0 else math.inf
        self.checked_steps = 0

    def check_block(self, means: torch.Tensor, block: torch.Tensor, chain: int, first_draw: int) -> None:
        """Non-finite values, or a draw whose mean train loss passed divergence_loss_ratio times its value at w*."""
        finite = torch.isfinite(block).all(1)
        bad = (~finite) | (means > self.limit)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            what = "non-finite losses" if not bool(finite[k]) else f"mean train loss {float(means[k]):.4g}"
            self._raise(chain, f"draw {first_draw + k}", what)

    def check_steps(self, losses: torch.Tensor, chain: int) -> None:
        """Non-finite minibatch losses among the steps not checked yet (`losses`: the chain's steps so far)."""
        new = losses[self.checked_steps :]
        if new.numel() and not bool(torch.isfinite(new).all()):
            k = self.checked_steps + int((~torch.isfinite(new)).nonzero()[0, 0])
            self._raise(chain, f"SGLD step {k}", "a non-finite minibatch loss")
        self.checked_steps = losses.numel()

    def _raise(self, chain: int, where: str, what: str) -> None:
        a = self.args
        raise SamplerDivergenceError(
            f"SGLD chain {chain} diverged at {where}: {what} (mean train loss at w* was {self.init_mean:.4g}; "
            f"the limit is divergence_loss_ratio={a.divergence_loss_ratio:g} times {self.scale:.4g}, the larger of "
            "that and the thermal scale num_weights / (2 nbeta)). Lower "
            f"`step_size` (now {a.step_size:g}) or `nbeta` (now {a.nbeta:g}), or raise `localization` "
            f"(now {a.localization:g}) in BIFArguments. No scores were written; the model is unchanged."
        )


def probe_sharpness(
    model: torch.nn.Module,
    views: LossViews,
    weights: SampledWeights,
    stream: MinibatchStream,
    args: BIFArguments,
    apply_root: Optional[Callable],
    localization: float,
) -> Optional[float]:
    """lambda_max of G^1/2 (nbeta/m H + localization) G^1/2 on the seeded probe minibatch; None on failure."""
    m = stream.batch_size
    rows = torch.randperm(stream.n, generator=torch.Generator().manual_seed(args.seed))[:m]
    batch = stream.source.gather(rows)
    try:
        return preconditioned_sharpness(
            lambda: views.summed_train_loss(batch, model),
            weights.params,
            scale=args.nbeta / m,
            localization=localization,
            preconditioner=apply_root,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic or a check must never stop the run
        logger.debug("Sharpness estimate skipped: %s", exc)
        return None
