"""The minibatch gradient a chain steps on: plain, or with the SGLD-CV control variate.

A minibatch B of m of the n training examples estimates the full gradient by (n/m) sum_B g_i(w); its noise is
the spread of the per-example gradients g_i, which does not vanish at w* and enters the drift as nbeta/m times
it, so it grows with nbeta^2 / m (README "Defaults"): at nbeta 1e5 and m = 128 it is two orders of magnitude
above the Langevin noise of a dimensionless step, and subspace-SGLD diverges on the UCI MLP within 5 steps.
The control variate of Baker, Fearnhead, Fox & Nemeth (2019, "Control variates for stochastic gradient MCMC")
subtracts the same minibatch's gradient at the mode and adds the full-batch gradient there:

    sum_B g_i(w)  ->  sum_B [g_i(w) - g_i(w*)] + m grad L(w*),

the same expectation, with a noise that is the spread of g_i(w) - g_i(w*) ~ H_i (w - w*): zero at w* and small
in a tight posterior. The cost is one more forward and backward of the minibatch per step (at w*), and the
full-batch gradient at w* once per run (`SamplerContext.anchor_gradient`, which `center_gradient` shares).
With a full-batch `sampler_batch_size` the two terms cancel exactly, so the engine does not use it there.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.samplers import SamplerContext


class StepGradient:
    """(minibatch loss at the chain's weights, the summed gradient its sampler steps on) for a batch of m rows."""

    def __init__(
        self,
        model: nn.Module,
        views: LossViews,
        weights: SampledWeights,
        context: SamplerContext,
        control_variate: bool,
    ) -> None:
        self.model = model
        self.views = views
        self.weights = weights
        self.context = context
        self.control_variate = control_variate
        # the chain's weights while the model is at w* (control variate only)
        self._saved = [torch.empty_like(p) for p in weights.params] if control_variate else []
        self.anchor_loss: Optional[torch.Tensor] = None  # the last minibatch's summed loss at w* (control variate)

    def __call__(
        self, batch: Any, batch_size: int, given: Optional[Tuple[torch.Tensor, List[torch.Tensor]]] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """`given`: the batch's (loss, gradient) at the current weights where the caller has them already (the
        full batch, from the draw's evaluation: `Evaluator.evaluate(..., gradient=params)`)."""
        params = self.weights.params
        loss, grads = self._gradient(batch) if given is None else given
        if not self.control_variate:
            return loss, grads
        with torch.no_grad():
            torch._foreach_copy_(self._saved, params)
            torch._foreach_copy_(params, self.weights.snapshot)  # w* in the model's own dtype
        try:
            self.anchor_loss, at_anchor = self._gradient(batch)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, self._saved)
        return loss, with_control_variate(grads, at_anchor, self.context.anchor_gradient(), batch_size)

    def _gradient(self, batch: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        with torch.enable_grad():
            loss = self.views.summed_train_loss(batch, self.model)
        return loss.detach(), list(torch.autograd.grad(loss, self.weights.params))


@torch.no_grad()
def with_control_variate(
    grads: Sequence[torch.Tensor], at_anchor: Sequence[torch.Tensor], mean: Sequence[torch.Tensor], batch_size: int
) -> List[torch.Tensor]:
    """grads - at_anchor + batch_size * mean: the minibatch's summed gradient minus its own at w*, plus m times the
    full-batch mean gradient at w* (`mean`, broadcast over a leading chain dimension in lockstep)."""
    out = torch._foreach_sub(list(grads), list(at_anchor))
    torch._foreach_add_(out, [g.to(d.dtype) for g, d in zip(mean, out)], alpha=float(batch_size))
    return out
