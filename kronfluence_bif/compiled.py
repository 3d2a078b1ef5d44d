"""`torch.compile` of the evaluation views (`BIFArguments.compile_evaluation`), with a fallback to eager.

Every draw evaluates the per-example (per-token) values of all train and query examples: the forward passes BIF
cannot avoid. Compiled with inductor (`dynamic=False`, one graph per batch shape) those forwards ran 2.2x faster
on `benchmarks/lm_per_token.py`'s tiny GPT-2 after 17 s of compilation, and 0.9x on the demo's small MLP
(`benchmarks/compile_views.py`), so it is an option, off by default. The weights enter the graph as inputs, so
the sampler's in-place updates are seen without recompiling. Values differ from eager in the last float bits.

Compilation happens at the first call of each batch shape, i.e. at the evaluation at w* before the chains start.
Where it fails (no C++ compiler for inductor on CPU, an operation dynamo cannot trace), the view logs one warning
and evaluates eagerly from then on, so a run never fails because of this option.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from kronfluence_bif.logs import warn_once

COMPILE_BACKEND = "inductor"  # torch.compile's backend for the views (tests trace with "eager" to stay fast)

View = Callable[[Any, nn.Module], torch.Tensor]


class CompiledView:
    """`view(batch, model)` through `torch.compile`, eager after the first failure; other attributes (the view's
    `width`, `check`) are the wrapped view's."""

    def __init__(self, view: View, label: str) -> None:
        self.view = view
        self.label = label
        self._compiled: Optional[Callable] = torch.compile(self._eager, backend=COMPILE_BACKEND, dynamic=False)

    def _eager(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.view(batch, model)

    def __call__(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self._compiled is None:
            return self.view(batch, model)
        try:
            return self._compiled(batch, model)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager view gives the same values
            values = self.view(batch, model)  # an error of the view itself is raised here, as without the option
            self._compiled = None
            warn_once(
                f"compile-{self.label}",
                f"BIFArguments.compile_evaluation: torch.compile of the {self.label} view failed "
                f"({_reason(exc)}); evaluating it eagerly. On CPU inductor needs a C++ compiler; "
                "set compile_evaluation=False to skip the attempt.",
            )
            return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["view"], name)


def _reason(exc: BaseException) -> str:
    """The root cause of a compiler error, `Type: first line` (dynamo wraps a backend's own exception)."""
    for _ in range(10):  # a bounded walk: a cause chain can be cyclic
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def maybe_compiled(view: View, label: str, enabled: bool) -> View:
    """`view` compiled when `enabled` (a `CompiledView`), else `view` itself."""
    return CompiledView(view, label) if enabled else view
