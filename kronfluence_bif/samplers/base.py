"""The sampler protocol: one Langevin update, a registry of preconditioners, and what the engine may ask of them.

Every sampler makes the same step (Welling & Teh 2011; paper, Algorithm 1)::

    w <- w - eps/2 * G (nbeta/m * sum_batch grad loss_k(w) + gamma * (w - w*)) + sqrt(eps) * G^1/2 xi

over a list of fp32 parameter tensors, with `_foreach` math. `Sampler.step` writes that update once; a sampler
is the preconditioner G: the identity (`sgld`), a diagonal that adapts then freezes (`rmsprop_sgld`), or a fixed
low-rank sketch (`sketch_sgld`, which fuses the whole update into one GEMM pair). What a sampler declares:

- `name` (its `BIFArguments.sampler` value, set by `register_sampler`), `default_step_size`;
- `check_arguments(args)`: its stability limits, raised as a ValueError naming the field (BIFArguments calls it);
- `build(params, anchors, args, generator, context)`: a chain's sampler from the run's settings; `context` gives
  what a preconditioner needs beyond the weights (a curvature sketch is built from the model and the data);
- `state_dict()/load_state_dict()`: what a resumed chain needs besides the weights;
- diagnostics: `track_norms`/`last_norms` (the step's three move norms), `apply_root` (v -> G^1/2 v), `freeze()`;
- optionally `temperature_ladder`, the (nbeta, localization) rungs of the temperature pilot, with
  `equilibrium_rise()` (the loss rise a healthy chain settles at) as its yardstick;
- optionally, for a chain that moves on a fixed span (`samples_on_span`), `linear_span()` (the span and the
  quadratic posterior's variance there) and `span_coordinates()`: what the linear control variate needs.

A new sampler is one module that subclasses `Sampler` and is decorated with `register_sampler("its_name")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import torch

if TYPE_CHECKING:  # type hints only: the samplers sit below the arguments and the engine
    from torch import nn

    from kronfluence_bif.arguments import BIFArguments
    from kronfluence_bif.data import MinibatchStream
    from kronfluence_bif.loss_views import LossViews
    from kronfluence_bif.parameters import SampledWeights

Vectors = List[torch.Tensor]
RootFn = Callable[[Vectors], Vectors]
SAMPLERS: Dict[str, Type[Sampler]] = {}  # name -> class, filled by `register_sampler`
ANCHOR_GRADIENT_KEY = "anchor_gradient"  # SamplerContext.cache: the full-batch gradient at w*
_S = TypeVar("_S", bound=Type["Sampler"])


def register_sampler(name: str) -> Callable[[_S], _S]:
    """Class decorator: make `cls` the sampler of `BIFArguments(sampler=name)`."""

    def register(cls: _S) -> _S:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A sampler name must be a non-empty string, got {name!r}.")
        existing = SAMPLERS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"Sampler name {name!r} is already registered to {existing.__qualname__}.")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return register


def sampler_class(name: str) -> Type[Sampler]:
    """The registered class of `name`; ValueError listing the registered names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"BIFArguments.sampler must be one of {list(SAMPLERS)}, got {name!r}.")
    return SAMPLERS[name]


def make_sampler(
    args: BIFArguments,
    params: Vectors,
    anchors: Vectors,
    generator: torch.Generator,
    context: SamplerContext,
    mirror: bool = False,
) -> Sampler:
    """One chain's sampler of `args.sampler`, centred at w* when `args.center_gradient`, negating its noise when
    `mirror` (an antithetic chain, `engine/seeds.py`); the engines' one entry."""
    sampler = sampler_class(args.sampler).build(params, anchors, args, generator, context)
    sampler.mirror = mirror
    if args.center_gradient:
        sampler.center(context.anchor_gradient())
    return sampler


@dataclass
class LinearSpan:
    """The span a chain moves on, w = w* + basis^T c, and the variance of each coordinate c_j under the quadratic
    posterior the chain samples exactly when the potential is quadratic on the span (the linear control variate's
    known covariance, `engine/linear_term.py`)."""

    basis: torch.Tensor  # [k, p]: orthonormal rows over the flattened sampled weights
    variance: torch.Tensor  # [k] float64

    @property
    def rank(self) -> int:
        return int(self.variance.numel())


@dataclass
class SamplerContext:
    """What a sampler may use besides its weights: the model and data at w*, and a curvature probe.

    Shared by the chains of one engine; `cache` keeps what every chain reuses (e.g. a curvature sketch), so it is
    built once per engine. `sharpness(apply_root, localization)` is lambda_max of G^1/2 (nbeta/m H + localization)
    G^1/2 on the run's seeded probe minibatch (None where double backward fails). `root_seed` seeds what is shared
    by the chains (the same on every process).
    """

    model: nn.Module
    views: LossViews
    weights: SampledWeights
    stream: MinibatchStream
    device: torch.device
    root_seed: int
    sharpness: Callable[[Optional[RootFn], float], Optional[float]]
    cache: Dict[str, Any] = field(default_factory=dict)

    def anchor_gradient(self) -> Vectors:
        """grad of the mean train loss at w* over the whole training set, in minibatches of the stream's size, in
        float64 sums (computed once per engine; the same on every process)."""
        if ANCHOR_GRADIENT_KEY not in self.cache:
            self.weights.reset()
            params, stream = self.weights.params, self.stream
            total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
            for start in range(0, stream.n, stream.batch_size):
                batch = stream.source.gather(torch.arange(start, min(start + stream.batch_size, stream.n)))
                with torch.enable_grad():
                    loss = self.views.summed_train_loss(batch, self.model)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t.add_(g.double())
            self.cache[ANCHOR_GRADIENT_KEY] = [(t / stream.n).float() for t in total]
        return self.cache[ANCHOR_GRADIENT_KEY]


class Sampler:
    """A Langevin sampler on `params` (updated in place), localized at `anchors`; G = 1 unless a subclass says so.

    The constructor validates its settings as `torch.optim.SGD` validates `lr`. The step is a template: the loss
    drift, the preconditioner's adaptation (`_adapt`), w - w*, the noise, then the move (`_move`); subclasses
    replace the preconditioner hooks (`_diagonal`, `preconditioner`) or, for a non-diagonal G, the move itself.
    The op order of each hook is what the pinned scores were computed with: changing it changes the last bits.
    """

    name: str = ""
    default_step_size: float = 3e-4
    # the sampler's values of the BIFArguments fields left None (`step_size` is `default_step_size`)
    defaults: Dict[str, Any] = {
        "nbeta": 1000.0,
        "localization": 1000.0,
        "sampler_batch_size": 64,
        "num_burnin_steps": 100,
        "sketch_rank": 128,
        "center_gradient": False,
        "control_variate": False,
        "linear_control_variate": False,
        "antithetic_chains": False,
        "num_draws": 400,
    }
    # (nbeta, localization) rungs the temperature pilot tries in this order before falling back to `defaults`
    # (BIFArguments.calibrate_temperature; engine/temperature.py); empty: the sampler has no ladder
    temperature_ladder: Tuple[Tuple[float, float], ...] = ()
    buffer_rows: int = 1  # flat work rows of numel(params): the last one holds the noise
    # noise scaled by sqrt(1 - eps/4), so a linear chain's variance is exact (the diagnostics' variance inflation)
    exact_linear_variance: bool = False
    # the chain moves on a fixed span only (`linear_span`, `span_coordinates`): BIFArguments.linear_control_variate
    samples_on_span: bool = False

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generator: torch.Generator,
    ) -> None:
        _require(step_size, "step_size", strict=True)
        _require(nbeta, "nbeta", strict=True)
        _require(localization, "localization", strict=False)
        self.params = list(params)
        self.anchors = list(anchors)
        if not self.params or len(self.params) != len(self.anchors):
            raise ValueError(f"Need one anchor per parameter tensor, got {len(self.params)} and {len(self.anchors)}.")
        self.step_size = float(step_size)
        self.nbeta = float(nbeta)
        self.localization = float(localization)
        self.generator = generator
        numel = sum(p.numel() for p in self.params)
        device, dtype = self.params[0].device, self.params[0].dtype
        self._rows = torch.empty(self.buffer_rows, numel, device=device, dtype=dtype)
        self._noise_flat = self._rows[-1]
        self._noise = split_like(self._noise_flat, self.params)
        self.num_steps = 0
        self.anchor_drift: Optional[Vectors] = None  # nbeta * grad L(w*) when centred (`center`), else None
        # when set, each step records the norms of its loss-gradient, localization and noise moves (diagnostics)
        self.track_norms = False
        self.last_norms: Optional[torch.Tensor] = None
        self.mirror = False  # negate every noise draw: an antithetic chain's (`make_sampler`)

    # ------------------------------------------------------------------ declared by each sampler
    @classmethod
    def argument_defaults(cls, args: BIFArguments) -> Dict[str, Any]:
        """The values of `args`' fields left None: `defaults` (over the base class's, so a sampler that declares only
        some still fills every field), unless a sampler's depend on other settings."""
        return {**Sampler.defaults, **cls.defaults}

    @classmethod
    def check_arguments(cls, args: BIFArguments) -> None:
        """The localization term alone must not make the chain oscillate and diverge (step x gamma x max G < 4)."""
        check_localization_limit(args, max_preconditioner=1.0, label="", fix=".")

    @classmethod
    def build(
        cls, params: Vectors, anchors: Vectors, args: BIFArguments, generator: torch.Generator, context: SamplerContext
    ) -> Sampler:
        """This sampler for one chain of a run with settings `args`."""
        return cls(params, anchors, args.step_size, args.nbeta, args.localization, generator)

    def equilibrium_rise(self) -> float:
        """The mean train loss above its value at w* that a healthy chain settles at: by equipartition, each of the
        d directions the chain moves in holds 1/2 of nbeta x loss, so at most d / (2 nbeta) (every direction
        constrained by the loss rather than the localization). Here d is the number of sampled weights."""
        return sum(p.numel() for p in self.params) / (2.0 * self.nbeta)

    # ------------------------------------------------------------------ the one update
    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], batch_size: int) -> None:
        """w <- w - eps/2 G (nbeta/m sum grad + gamma (w - w*)) + sqrt(eps) G^1/2 xi, for `grads` summed over a
        minibatch of `batch_size` examples."""
        drift = self._loss_drift(grads, batch_size)
        if self.anchor_drift is not None:
            torch._foreach_sub_(drift, self.anchor_drift)
        self._adapt(drift)
        diff = self._offset()
        noise = self._sample_noise()
        if self.mirror:
            torch._foreach_neg_(noise)
        self._move(drift, diff, noise)
        self.num_steps += 1

    def _loss_drift(self, grads: Sequence[torch.Tensor], batch_size: int) -> Vectors:
        """nbeta/m * sum of per-example gradients, in the parameters' dtype."""
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, self.params)]
        return torch._foreach_mul(grads, self.nbeta / batch_size)

    def _adapt(self, drift: Vectors) -> None:
        """Update an adaptive preconditioner from this step's loss drift (nothing for a fixed G)."""

    def _offset(self) -> Optional[Vectors]:
        """w - w*, computed once per step when the localization or the norm tracking needs it."""
        if self.localization != 0.0 or self.track_norms:
            return torch._foreach_sub(self.params, self.anchors)
        return None

    def _sample_noise(self) -> Vectors:
        self._noise_flat.normal_(generator=self.generator)
        return self._noise

    def _diagonal(self) -> Tuple[Optional[Vectors], Optional[Vectors]]:
        """(G, G^1/2) of this step for a diagonal G; (None, None) for G = 1."""
        return None, None

    def _move(self, drift: Vectors, diff: Optional[Vectors], noise: Vectors) -> None:
        """The update with a diagonal G (`_diagonal`): drift and noise are this step's work tensors (consumed)."""
        precond, root = self._diagonal()
        norms = self._term_norms(drift, diff, precond) if self.track_norms else None
        if self.localization != 0.0:
            torch._foreach_add_(drift, diff, alpha=self.localization)
        if precond is not None:
            torch._foreach_mul_(drift, precond)
        torch._foreach_add_(self.params, drift, alpha=-0.5 * self.step_size)
        if root is not None:
            noise = torch._foreach_mul(noise, root)
        torch._foreach_add_(self.params, noise, alpha=math.sqrt(self.step_size))
        if norms is not None:
            self.last_norms = torch.stack([*norms, math.sqrt(self.step_size) * global_norm(noise)])

    def _term_norms(
        self, loss_drift: Vectors, diff: Vectors, precond: Optional[Vectors]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Norms of this step's loss-gradient and localization moves (before they are added)."""
        half = 0.5 * self.step_size
        if precond is not None:  # out of place: `diff` is still needed unscaled by the localization
            loss_drift = torch._foreach_mul(loss_drift, precond)
            diff = torch._foreach_mul(diff, precond)
        return half * global_norm(loss_drift), half * self.localization * global_norm(diff)

    def center(self, anchor_gradient: Sequence[torch.Tensor]) -> None:
        """Drive the chain by grad L(w) - grad L(w*) (`anchor_gradient`: the full-batch mean train-loss gradient at
        w*), so w* is a stationary point of the sampled potential (`BIFArguments.center_gradient`)."""
        self.anchor_drift = [
            torch.mul(g.to(device=p.device, dtype=p.dtype), self.nbeta) for g, p in zip(anchor_gradient, self.params)
        ]

    # ------------------------------------------------------------------ the span (samplers that move on one)
    def linear_span(self) -> Optional[LinearSpan]:
        """The span this chain moves on and its quadratic posterior's variances, where they are exact for the chain
        (None otherwise: every weight moves, or the variances are approximate)."""
        return None

    def span_coordinates(self) -> torch.Tensor:
        """[k]: the chain's coordinates on `linear_span()`, basis (w - w*), read after a step (not a copy)."""
        raise NotImplementedError(f"{type(self).__name__} does not move on a span.")

    # ------------------------------------------------------------------ diagnostics and resume
    def freeze(self) -> None:
        """Stop adapting the preconditioner (after burn-in); nothing adapts in a fixed G."""

    @property
    def preconditioner(self) -> Optional[Vectors]:
        """The diagonal preconditioner G of the next step; None when G = 1 (or G is not diagonal)."""
        return None

    @property
    def apply_root(self) -> Optional[RootFn]:
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


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over a list of tensors, as a 0-dim tensor on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vectors:
    """Views of the flat `flat` shaped as the tensors of `like`, in order."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


def _require(value: Any, name: str, strict: bool) -> None:
    """A finite float > 0 (or >= 0); the error names the setting, as torch.optim does."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (float(value) <= 0.0 if strict else float(value) < 0.0):
        raise ValueError(f"Invalid {name}: {value!r} (a finite number {'>' if strict else '>='} 0).")


def check_localization_limit(args: BIFArguments, max_preconditioner: float, label: str, fix: str) -> None:
    """step_size * localization * max G < 4, or the localization term alone makes the chain diverge."""
    product = float(args.step_size) * float(args.localization) * max_preconditioner
    if product >= 4.0:
        raise ValueError(
            f"BIFArguments.step_size * localization{label} must be < 4, got {product:g}: the localization "
            "term alone would make the chain oscillate and diverge. Lower `step_size` or `localization`" + fix
        )
