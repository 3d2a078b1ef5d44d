"""Which weights SGLD moves, their fp32 master copies, and the guarantee that the model gets w* back."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

CONSTANT_SUFFIX = "_constant"  # kronfluence's TrackedModule adds a zero scalar that must never be sampled


def select_parameters(
    model: nn.Module, module_names: Optional[Sequence[str]], patterns: Optional[Sequence[str]] = None
) -> List[Tuple[str, nn.Parameter]]:
    """Floating-point parameters matching `patterns` (fnmatch on parameter or module names), else those of
    `module_names` (the Task's tracked modules), else the whole model's. Any module type can be selected."""
    if patterns:
        named = list(model.named_parameters())
        selected = [
            (n, p) for n, p in named if any(fnmatch(n, pat) or fnmatch(n.rpartition(".")[0], pat) for pat in patterns)
        ]
        if not selected:
            raise ValueError(
                f"BIFArguments.sampled_modules {list(patterns)} matches no parameter of the model. Parameter names "
                f"look like {[n for n, _ in named[:6]]}; use fnmatch patterns such as '*.attn.*'."
            )
    elif module_names:
        available = dict(model.named_modules())
        selected: List[Tuple[str, nn.Parameter]] = []
        for name in module_names:
            if name not in available:
                candidates = [n for n in available if n and n.split(".")[-1] == name.split(".")[-1]][:5]
                raise ValueError(
                    f"`get_influence_tracked_modules()` names `{name}`, which is not a module of the model. "
                    f"Use names from `model.named_modules()`" + (f", e.g. {candidates}." if candidates else ".")
                )
            selected += [(f"{name}.{p}" if p else name, t) for p, t in available[name].named_parameters()]
    else:
        selected = list(model.named_parameters())
    seen, params = set(), []
    for name, param in selected:
        if name.endswith(CONSTANT_SUFFIX) or not param.is_floating_point() or id(param) in seen:
            continue
        seen.add(id(param))
        params.append((name, param))
    if not params:
        raise ValueError(
            "No floating-point parameters to sample: the model has none"
            + (f" in the tracked modules {list(module_names)}." if module_names else ".")
        )
    return params


def module_units(
    model: nn.Module,
    module_names: Optional[Sequence[str]],
    tracked_names: Sequence[str],
    patterns: Optional[Sequence[str]] = None,
) -> List[Tuple[str, List[Tuple[str, nn.Parameter]]]]:
    """The modules of per-module BIF scores, each with the sampled parameters it holds (the paper's App. B.1
    weight-restricted posterior samples one unit at a time).

    Units are the Task's tracked modules, else kronfluence's `TrackedModule`s (`tracked_names`, its per-module score
    keys), else every module that owns sampled parameters directly; a parameter of the root module itself is a
    unit of its own, named after it. Only parameters `select_parameters` samples are counted.
    """
    sampled = select_parameters(model, module_names, patterns)
    units = []
    for name in list(module_names or tracked_names):
        held = [(n, p) for n, p in sampled if n.startswith(f"{name}.")]
        if held:
            units.append((name, held))
    if units:
        return units
    owners: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    for n, p in sampled:
        owners.setdefault(n.rpartition(".")[0] or n, []).append((n, p))
    return list(owners.items())


class SampledWeights:
    """Context manager: fp32 masters of the sampled weights; on exit the model is bitwise w* again.

    fp32 parameters are updated in place (their master is the parameter itself); bf16/fp16 ones get an fp32
    master that is copied into the model after every step (eps-sized noise would round to zero in bf16).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tuple[str, nn.Parameter]]) -> None:
        self.model = model
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]

    def __enter__(self) -> SampledWeights:
        self._training = self.model.training
        self._requires_grad = [p.requires_grad for p in self.params]
        with torch.no_grad():
            self.snapshot = [p.detach().clone() for p in self.params]
            self.anchors = [s if s.dtype == torch.float32 else s.float() for s in self.snapshot]
            self.masters = [p.data if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        # (master, parameter) where the master is a separate fp32 copy: what `sync` copies after every step
        self._pairs = [(m, p) for m, p in zip(self.masters, self.params) if m.data_ptr() != p.data_ptr()]
        self.model.eval()
        for p in self.params:
            p.requires_grad_(True)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Put w* back into the masters and the model (start of a chain)."""
        torch._foreach_copy_(self.masters, self.anchors)
        self.sync()

    def sync(self) -> None:
        """Copy separate fp32 masters into the (low-precision) model parameters (called after every step: with
        fp32 weights it returns at once)."""
        if not self._pairs:
            return
        with torch.no_grad():
            for master, param in self._pairs:
                param.copy_(master)

    @torch.no_grad()
    def distance_from_anchor(self) -> torch.Tensor:
        diffs = torch._foreach_sub(self.masters, self.anchors)
        norms = torch._foreach_norm(diffs)
        return torch.stack(norms).square().sum().sqrt()

    def masters_state(self) -> Dict[str, torch.Tensor]:
        return {f"master.{i}": m for i, m in enumerate(self.masters)}

    @torch.no_grad()
    def load_masters_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Put a checkpoint's weights into the masters and the model (resume)."""
        for i, master in enumerate(self.masters):
            master.copy_(state[f"master.{i}"])
        self.sync()

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for param, saved in zip(self.params, self.snapshot):
                param.copy_(saved)
        for param, flag in zip(self.params, self._requires_grad):
            param.requires_grad_(flag)
        self.model.train(self._training)
        self.snapshot = self.anchors = self.masters = []
