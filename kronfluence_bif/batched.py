"""Chains as a batch dimension: K weight sets of one model evaluated and stepped together (issue 15 prototype).

BIF's cost is N_draws x (n + q) evaluation forwards and N_draws minibatch steps. Run chain by chain, each of
those is one small forward per chain: on a GPU a small or mid-size model is launch-bound, so K chains cost K times
the launches. Stacking the K chains' sampled weights into ``[K, ...]`` tensors and calling the model once under
`torch.func.vmap` (with `torch.func.functional_call`) turns every matrix product into one batched product over
the chains: one launch sequence per evaluation batch for all K chains.

This module is standalone (the engine does not use it yet):

- `stack_weights` / `unstack_weights`: K ``{name: tensor}`` dicts <-> one ``{name: [K, ...]}`` dict.
- `ChainBatch`: given the model, the sampled parameter names and the stacked weights, `evaluate(view, batch)`
  returns ``[K, B]`` or ``[K, B, T]`` (the view's output per chain), and `summed_losses(loss_fn, batches)` the
  K minibatch losses (differentiable w.r.t. the stacked weights). Where the model or view cannot be vmapped
  (data-dependent Python control flow, ``.item()``, in-place ops on captured tensors), it falls back to a loop of
  `functional_call`, once and for good, with a log line; the values are the same.
- `BatchedSGLD`: the plain-SGLD step of `kronfluence_bif.sampler.SGLD` on the stacked weights, one update for
  all K chains; chain k draws its noise from its own generator in the same order as `SGLD`, so a batched chain
  is the same chain as the per-chain sampler's (to float rounding).

Parameters that are not sampled stay in the model and are shared by all chains.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from kronfluence_bif.logs import logger

View = Callable[[Any, nn.Module], torch.Tensor]
Stacked = Dict[str, torch.Tensor]


def stack_weights(weights: Sequence[Dict[str, torch.Tensor]]) -> Stacked:
    """K dicts of the same names -> one dict of ``[K, ...]`` tensors (new memory, detached)."""
    if not weights:
        raise ValueError("stack_weights needs at least one weight set.")
    names = list(weights[0])
    for k, w in enumerate(weights):
        if list(w) != names:
            raise ValueError(f"stack_weights: weight set {k} has names {list(w)}, expected {names}.")
    return {name: torch.stack([w[name].detach() for w in weights]) for name in names}


def unstack_weights(stacked: Stacked) -> List[Dict[str, torch.Tensor]]:
    """One dict of ``[K, ...]`` tensors -> K dicts of views into it."""
    k = next(iter(stacked.values())).shape[0]
    return [{name: t[i] for name, t in stacked.items()} for i in range(k)]


def replicate(model: nn.Module, names: Sequence[str], k: int) -> Stacked:
    """The model's current values of `names`, repeated K times: K chains starting at w*."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"replicate: {missing} are not parameters of the model.")
    return {n: params[n].detach().unsqueeze(0).repeat(k, *([1] * params[n].dim())).contiguous() for n in names}


def stack_batches(batches: Sequence[Any]) -> Any:
    """K minibatches of the same structure and shapes -> one batch whose tensor leaves are ``[K, m, ...]``."""
    return tree_map(lambda *leaves: torch.stack(leaves) if isinstance(leaves[0], torch.Tensor) else leaves[0], *batches)


class _ViewCall(nn.Module):
    """`view(batch, model)` as a module, so `functional_call` swaps the weights the view's model call sees."""

    def __init__(self, model: nn.Module, view: View) -> None:
        super().__init__()
        self.model = model
        self.view = view

    def forward(self, batch: Any) -> torch.Tensor:
        return self.view(batch, self.model)


class ChainBatch:
    """K weight sets of one model, evaluated together: `vmap` over the chains, a loop where vmap fails.

    `mode`: "auto" (vmap, falling back to the loop at the first failure), "vmap" (raise if it fails) or "loop".
    """

    def __init__(self, model: nn.Module, names: Sequence[str], stacked: Stacked, mode: str = "auto") -> None:
        if mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"ChainBatch(mode=...) must be 'auto', 'vmap' or 'loop', got {mode!r}.")
        sizes = {t.shape[0] for t in stacked.values()}
        if len(sizes) != 1 or list(stacked) != list(names):
            raise ValueError("ChainBatch: `stacked` must hold [K, ...] tensors for exactly `names`, in order.")
        self.model = model
        self.names = list(names)
        self.stacked = stacked
        self.num_chains = sizes.pop()
        self.mode = mode
        self.fallback_reason: Optional[str] = None

    def _prefixed(self, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {f"model.{name}": t for name, t in weights.items()}

    def _vmapped(self, view: View, batch: Any, batch_dim: Optional[int]) -> torch.Tensor:
        call = _ViewCall(self.model, view)

        def one(weights: Dict[str, torch.Tensor], chain_batch: Any) -> torch.Tensor:
            return torch.func.functional_call(call, self._prefixed(weights), (chain_batch,))

        dims = batch_dim if batch_dim is None else tree_map(lambda t: batch_dim if torch.is_tensor(t) else None, batch)
        return torch.func.vmap(one, in_dims=(0, dims), randomness="error")(self.stacked, batch)

    def _looped(self, view: View, batch: Any, batch_dim: Optional[int]) -> torch.Tensor:
        call = _ViewCall(self.model, view)
        out = []
        for k, weights in enumerate(unstack_weights(self.stacked)):
            chain_batch = (
                batch
                if batch_dim is None
                else tree_map(lambda t, k=k: t[k] if isinstance(t, torch.Tensor) else t, batch)
            )
            out.append(torch.func.functional_call(call, self._prefixed(weights), (chain_batch,)))
        return torch.stack(out)

    def _apply(self, view: View, batch: Any, batch_dim: Optional[int]) -> torch.Tensor:
        if self.mode == "loop":
            return self._looped(view, batch, batch_dim)
        try:
            return self._vmapped(view, batch, batch_dim)
        except Exception as exc:  # noqa: BLE001 - any vmap failure means: use the loop (unless vmap was required)
            if self.mode == "vmap":
                raise
            self.mode = "loop"
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.info("Chains cannot be batched with torch.func.vmap (%s); looping over them.", self.fallback_reason)
            return self._looped(view, batch, batch_dim)

    def evaluate(self, view: View, batch: Any) -> torch.Tensor:
        """`view(batch, model)` under each chain's weights, ``[K, B]`` or ``[K, B, T]``; the same batch for all."""
        return self._apply(view, batch, None)

    def summed_losses(self, loss_fn: View, batches: Any) -> torch.Tensor:
        """``[K]`` losses, chain k on its own minibatch (`batches` leaves ``[K, m, ...]``, see `stack_batches`).

        Differentiable w.r.t. the stacked weights: ``autograd.grad(losses.sum(), stacked)`` gives every chain's
        gradient at once (the chains share no weights, so the sum separates).
        """
        return self._apply(loss_fn, batches, 0)


class BatchedSGLD:
    """Plain SGLD (`kronfluence_bif.sampler.SGLD`) on stacked ``[K, ...]`` weights, updated in place.

    ``w_k <- w_k - eps/2 (nbeta/m g_k + gamma (w_k - w*)) + sqrt(eps) xi_k``, with xi_k drawn from
    `generators[k]` into one flat buffer per chain in parameter order (what `SGLD` does), so chain k's noise
    stream is that of a per-chain `SGLD` seeded the same way.
    """

    def __init__(
        self,
        stacked: Stacked,
        anchors: Dict[str, torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generators: Sequence[torch.Generator],
    ) -> None:
        self.params = list(stacked.values())
        self.num_chains = self.params[0].shape[0]
        if len(generators) != self.num_chains:
            raise ValueError(f"BatchedSGLD needs one generator per chain ({self.num_chains}), got {len(generators)}.")
        self.anchors = [anchors[name].unsqueeze(0) for name in stacked]  # broadcast over chains
        self.step_size, self.nbeta, self.localization = float(step_size), float(nbeta), float(localization)
        self.generators = list(generators)
        numel = sum(p[0].numel() for p in self.params)
        self._noise_flat = torch.empty(self.num_chains, numel, device=self.params[0].device, dtype=self.params[0].dtype)
        self._noise = self._split(self._noise_flat)
        self.num_steps = 0

    def _split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            size = p[0].numel()
            out.append(flat[:, offset : offset + size].view(p.shape))
            offset += size
        return out

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], batch_size: int) -> None:
        """One step of every chain; `grads[i]` is ``[K, ...]``: chain k's summed minibatch gradient."""
        drift = torch._foreach_mul(list(grads), self.nbeta / batch_size)
        if self.localization != 0.0:
            torch._foreach_add_(drift, torch._foreach_sub(self.params, self.anchors), alpha=self.localization)
        torch._foreach_add_(self.params, drift, alpha=-0.5 * self.step_size)
        for k, generator in enumerate(self.generators):
            self._noise_flat[k].normal_(generator=generator)
        torch._foreach_add_(self.params, self._noise, alpha=math.sqrt(self.step_size))
        self.num_steps += 1


def batched_sgld_step(
    chains: ChainBatch, sampler: BatchedSGLD, loss_fn: View, batches: Any, batch_size: int
) -> torch.Tensor:
    """One SGLD step of all K chains on their own minibatches; returns the K losses (detached)."""
    with torch.enable_grad():
        leaves = [t.requires_grad_(True) for t in chains.stacked.values()]
        losses = chains.summed_losses(loss_fn, batches)
        grads = torch.autograd.grad(losses.sum(), leaves)
    for t in leaves:
        t.requires_grad_(False)
    sampler.step(grads, batch_size)
    return losses.detach()
