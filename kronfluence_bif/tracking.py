"""What kronfluence can track in a model, and how BIF works on a model where it can track nothing.

kronfluence wraps `nn.Linear` / `nn.Conv2d` leaves in `TrackedModule`s and refuses any model without one. BIF needs
no wrappers: it samples parameters. This module gives `prepare_model` for any `nn.Module` (kronfluence's
wrappers where they fit, nothing where they do not) and lets the Analyzer start on a model with nothing tracked,
keeping kronfluence's own error (plus one sentence) for the kronfluence strategies, which do need wrappers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence

from kronfluence.module import TrackedModule
from kronfluence.module.utils import get_tracked_module_names, wrap_tracked_modules
from kronfluence.task import Task
from kronfluence.utils.exceptions import IllegalTaskConfigurationError, TrackedModuleNotFoundError
from torch import nn

from kronfluence_bif.logs import logger


def tracked_module_names(model: nn.Module) -> List[str]:
    """Names of kronfluence's `TrackedModule` wrappers in `model` (kronfluence's per-module score keys)."""
    return get_tracked_module_names(model)


class _TrackOnly:
    """A Task seen by kronfluence's wrapper installer with its tracked-module list replaced."""

    def __init__(self, task: Task, names: List[str]) -> None:
        self._task = task
        self._names = names

    def get_influence_tracked_modules(self) -> List[str]:
        return self._names

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def prepare_model(model: nn.Module, task: Task) -> nn.Module:
    """kronfluence's `prepare_model` for any model: freeze it, put it in eval mode, wrap what kronfluence can track.

    Differences from kronfluence, for models it cannot handle: a model with no `nn.Linear`/`nn.Conv2d` (or a Task
    naming only other module types, such as GPT-2's `Conv1D`) is returned unwrapped instead of raising, since
    strategy "bif" needs no wrappers; a model that *is* an `nn.Linear`/`nn.Conv2d` is left unwrapped too
    (kronfluence would wrap the root inside itself and recurse forever). Names the Task gives that are not modules
    of the model still raise kronfluence's `IllegalTaskConfigurationError`.
    """
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    for buffer in model.buffers():
        buffer.requires_grad = False
    names = task.get_influence_tracked_modules()
    modules = dict(model.named_modules())
    _check_names_exist(names, modules)
    if any(isinstance(m, TrackedModule) for m in modules.values()):
        return model  # already prepared
    supported = tuple(TrackedModule.SUPPORTED_MODULES)
    wanted = list(modules) if names is None else list(names)
    trackable = [n for n in wanted if n and isinstance(modules[n], supported) and not list(modules[n].children())]
    if isinstance(model, supported):
        logger.warning(
            "The model itself is a %s, which kronfluence cannot wrap (it would recurse forever); it is left as it "
            "is. Strategy 'bif' samples its parameters; for kronfluence's strategies wrap it: nn.Sequential(model).",
            type(model).__name__,
        )
    if not trackable:
        logger.info(
            "kronfluence can track no module of this model (it tracks %s); strategy 'bif' samples %s.",
            ", ".join(m.__name__ for m in supported),
            "the Task's modules" if names else "every parameter",
        )
        return model
    return wrap_tracked_modules(model=model, task=_TrackOnly(task, trackable))


def _check_names_exist(names: Optional[Sequence[str]], modules: dict) -> None:
    if names is None:
        return
    missing = [n for n in names if n not in modules]
    if missing:
        raise IllegalTaskConfigurationError(
            f"`get_influence_tracked_modules()` names {missing}, which are not modules of the model. Use names from "
            f"`model.named_modules()`, e.g. {[n for n in modules if n][:6]}."
        )


@contextlib.contextmanager
def untracked_model_allowed(model: nn.Module) -> Iterator[bool]:
    """During kronfluence's `Computer.__init__`: accept a model with no tracked module; yields whether it has none.

    kronfluence's constructor refuses such a model and, under torchrun, wraps it in DDP, which refuses a model
    with no trainable parameter; both are skipped for it (BIF samples an unwrapped model anyway).
    """
    import kronfluence.computer.computer as computer

    if tracked_module_names(model):
        yield False
        return
    original_names, original_ddp = computer.get_tracked_module_names, computer.DDP
    computer.get_tracked_module_names = lambda _model: ["(none: strategy 'bif' samples parameters)"]
    computer.DDP = _NoDDP
    try:
        yield True
    finally:
        computer.get_tracked_module_names, computer.DDP = original_names, original_ddp


class _NoDDP:
    """Stands in for DDP while a model with nothing tracked is set up: no wrapper (a DDP model stays itself)."""

    def __new__(cls, module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        return module


def untracked_error(model: nn.Module, what: str) -> TrackedModuleNotFoundError:
    """kronfluence's own error for a model with no tracked module, plus the sentence that strategy "bif" works."""
    root = ""
    if isinstance(model, tuple(TrackedModule.SUPPORTED_MODULES)):
        root = (
            f" kronfluence cannot wrap a model that is itself a {type(model).__name__}: wrap it, nn.Sequential(model)."
        )
    return TrackedModuleNotFoundError(
        f"No tracked modules found in the provided model: {model}. Please ensure you've run `prepare_model` before "
        f"passing it to the Analyzer.{root} {what} needs them, but strategy 'bif' works on this model as it is "
        "(it samples parameters, no tracked modules needed): `Analyzer(..., strategy='bif')`."
    )


@contextlib.contextmanager
def untracked_forwards(model: nn.Module) -> Iterator[int]:
    """Inside: every kronfluence `TrackedModule` in `model` calls its original module directly (yields how many).

    A TrackedModule's forward adds a zero constant to outputs that need no gradient, so that kronfluence's hooks
    see every module; BIF evaluates thousands of draws under `inference_mode`, where that is one more full-size
    elementwise op and one more Python call per wrapped layer (about 5% of a UCI run). The outputs are the same
    values (x + 0 = x). Only the instance's `forward` is replaced, so module names and parameters do not change,
    and it is restored on exit, whatever happens.
    """
    wrapped = [m for m in model.modules() if isinstance(m, TrackedModule) and "forward" not in vars(m)]
    for module in wrapped:
        original = module.original_module
        hooked = original._forward_hooks or original._forward_pre_hooks
        module.forward = original if hooked else original.forward
    try:
        yield len(wrapped)
    finally:
        for module in wrapped:
            del module.forward
