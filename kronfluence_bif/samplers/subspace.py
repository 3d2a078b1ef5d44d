"""Subspace-SGLD: Langevin restricted to the span of the curvature sketch, with Rayleigh-Ritz eigenvalues.

G = V diag(1 / (nbeta s + gamma)) V^T, zero off span(V): the chain never leaves w* + span(V). V is the Fisher
sketch of `sketch_sgld` (`sketch.build_sketch`, shared by the chains); its eigenvalues s are then refined by
Rayleigh-Ritz on the span (`rayleigh_ritz`): k Hessian-vector products of the summed train loss on a seeded
minibatch, the k x k projection V^T H V / m diagonalized, and V rotated to its eigenvectors. With a full-batch
`sampler_batch_size` the chain's potential restricted to the span then has Hessian exactly V diag(nbeta s + gamma) V^T
near w* (for any span, invariant or not), so G A = 1 there and `step_size` is dimensionless (default 1.0).

Why the span: the linearized model's loss cross-covariances only see the posterior covariance on the span of the
training Jacobians, which the sketch approximates; dropping the unconstrained directions leaves that estimand and
keeps the draws near w*, where the network is nearly linear (issue 14; benchmarks/subspace_sampler.py).
Where double backward fails, the sketch's own eigenvalues are kept (one log line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch

from kronfluence_bif.curvature import CurvatureSketch, double_backward, gram64, rotate64
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.samplers.base import (
    LinearSpan,
    RootFn,
    Sampler,
    SamplerContext,
    Vectors,
    register_sampler,
    split_like,
)
from kronfluence_bif.samplers.sketch import SketchSGLD, build_sketch, check_dimensionless

if TYPE_CHECKING:
    from kronfluence_bif.arguments import BIFArguments

SUBSPACE_CACHE_KEY = "subspace_sgld.sketch"
_RITZ_SEED = 0x5175  # XORed into the run's root seed: the Rayleigh-Ritz minibatch (the same on every process)


@register_sampler("subspace_sgld")
class SubspaceSGLD(SketchSGLD):
    """SGLD with G = V diag(prec) V^T, prec = 1 / (nbeta s + gamma), zero off the span of V (`basis` holds V^T).

    One step: w <- w + V (sqrt(eps (1 - eps/4) prec) xi_k - eps/2 prec (V^T drift + gamma c)), with xi_k standard
    normal on the span and c = V^T (w - w*) tracked on the span: one GEMV onto the span and one back. Started at
    w*, the chain stays in w* + span(V). The noise factor sqrt(1 - eps/4) makes the linear chain's stationary
    variance exact on every Ritz direction (plain SGLD inflates it by (1 - eps/4)^-1), so eps can be near 2, where
    the linear chain draws i.i.d.; the default 1.0 keeps room for the curvature growing away from w*.
    The drift is centred at w* by default (`BIFArguments.center_gradient`), and Ritz directions of curvature <= 0
    are dropped from the span (`refine_sketch`).
    """

    default_step_size = 1.0  # dimensionless: G A = 1 on the span with exact Ritz values
    defaults = {
        **SketchSGLD.defaults,
        "nbeta": 1e5,
        "localization": 1e3,
        "sampler_batch_size": None,  # the whole training set: a tight posterior needs the full-batch gradient
        "num_burnin_steps": 20,
        "sketch_rank": 256,
        "center_gradient": True,
        "control_variate": True,
        "linear_control_variate": True,
        "antithetic_chains": True,
        "num_draws": 100,  # the linear control variate on: UCI LDS 0.314-0.319; 4 x 400 without it 0.302-0.322
    }
    # in order of preference: hotter at the defaults' damping 0.01 (UCI LDS 0.307 -> 0.347; digits diverges at
    # 3e4 / 3e2), then damping 3e-3 at the defaults' localization (digits 0.389 -> 0.425, two seeds)
    temperature_ladder = ((1e4, 1e2), (3e4, 3e2), (3e5, 1e3))
    buffer_rows = 2  # loss drift, w - w*; the noise is drawn on the span (k numbers, not p)
    exact_linear_variance = True
    samples_on_span = True

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        step_size: float,
        nbeta: float,
        localization: float,
        generator: torch.Generator,
        sketch: CurvatureSketch,
        exact_span: bool = False,
    ) -> None:
        """`exact_span`: the sketch's eigenvalues are the chain's own curvature on the span (Rayleigh-Ritz values of
        the loss the chain's full-batch gradient follows), so `linear_span` offers the quadratic posterior there."""
        super().__init__(params, anchors, step_size, nbeta, localization, generator, sketch)
        curvature = sketch.eigenvalues.double().clamp_min(0.0)
        precision = self.nbeta * curvature + self.localization
        self._variance = (1.0 / precision) if exact_span else None  # float64: the linear control variate's
        self.prec = (1.0 / precision).to(self.basis.dtype)
        self._rise = 0.5 * float((curvature / precision).sum())  # equipartition on the span: 1/2 sum s / (nbeta s + g)
        # sqrt(1 - eps/4): the AR(1) a linear chain is on each Ritz direction then has exactly the target variance
        self.noise_scale = torch.sqrt(self.step_size * (1.0 - self.step_size / 4.0) / precision).to(self.basis.dtype)
        self._span_noise = torch.empty(sketch.rank, dtype=self.basis.dtype, device=self.basis.device)
        # V^T (w - w*), kept on the span instead of projected each step (the chain moves only along V); None: to be
        # projected from the weights (a new or resumed chain)
        self._coef: Optional[torch.Tensor] = None

    @classmethod
    def argument_defaults(cls, args: BIFArguments) -> Dict[str, object]:
        """`defaults`, but the others' draws and no antithetic pairs where the linear control variate will not take
        the leading term: a set `sampler_batch_size` (a minibatch: the Ritz values are not the chain's) or
        `linear_control_variate=False`. Without it the draws estimate the linear part too, whose products a pair
        repeats instead of cancelling (the same chains' plain covariance: UCI LDS 0.250 -> 0.223, digits 0.363 ->
        0.336 with pairs)."""
        values = super().argument_defaults(args)
        if args.sampler_batch_size is not None or args.linear_control_variate is False:
            values["num_draws"] = Sampler.defaults["num_draws"]
            values["antithetic_chains"] = Sampler.defaults["antithetic_chains"]
        return values

    @classmethod
    def check_arguments(cls, args: BIFArguments) -> None:
        check_dimensionless(
            args,
            "subspace_sgld",
            "its preconditioner is 1 / (nbeta s + localization) on the sketch, s >= 0",
            "it is dimensionless, G A ~ 1 on the span; typical 0.5 to 1",
            "the chain would oscillate and diverge",
        )

    @classmethod
    def build(
        cls, params: Vectors, anchors: Vectors, args: BIFArguments, generator: torch.Generator, context: SamplerContext
    ) -> SubspaceSGLD:
        """The chain's sampler, with the run's refined sketch (built on the first chain, then from the context)."""
        if SUBSPACE_CACHE_KEY not in context.cache:
            sketch = build_sketch(context, args)
            _check_rank(sketch, args, context)
            context.cache[SUBSPACE_CACHE_KEY] = refine_sketch(sketch, context)
        sketch = context.cache[SUBSPACE_CACHE_KEY]
        n = context.stream.n
        exact = sketch.ritz_rows >= n and context.stream.batch_size >= n  # full-batch Ritz values and gradient
        return cls(params, anchors, args.step_size, args.nbeta, args.localization, generator, sketch, exact)

    def equilibrium_rise(self) -> float:
        """1/2 sum_j s_j / (nbeta s_j + gamma) over the span's Ritz values: the quadratic posterior's mean loss rise."""
        return self._rise

    def linear_span(self) -> Optional[LinearSpan]:
        """The span V and 1 / (nbeta s + gamma), the chain's exact variance on each Ritz direction where the
        potential is quadratic; None where the Ritz values are not the chain's (a minibatch, or no double backward)."""
        return None if self._variance is None else LinearSpan(self.basis, self._variance)

    def span_coordinates(self) -> torch.Tensor:
        """c = V^T (w - w*), tracked by the step (zeros before the first step of a new chain)."""
        if self._coef is None:
            self._offset()
        return self._coef

    # ------------------------------------------------------------------ the update, fused
    def _sample_noise(self) -> Vectors:
        """V^T xi for xi ~ N(0, I_p) is N(0, I_k) (V orthonormal): draw the k coefficients directly."""
        self._span_noise.normal_(generator=self.generator)
        return [self._span_noise]

    def _offset(self) -> None:
        """w - w* is V c on the span, with c tracked by `_move`: no pass over the weights."""
        if self._coef is None:
            torch._foreach_copy_(self._diff_views, self.params)
            torch._foreach_sub_(self._diff_views, self.anchors)
            self._coef = torch.mv(self.basis, self._rows[1])
        return None

    def _move(self, drift: Vectors, diff: Optional[Vectors], noise: Vectors) -> None:
        """w <- w + V (noise_scale xi_k - eps/2 prec (V^T drift + gamma c)): one GEMV onto the span, one back."""
        eps, gamma = self.step_size, self.localization
        coef = torch.mv(self.basis, self._rows[0])  # V^T drift
        loss_move = (0.5 * eps) * self.prec * coef
        local_move = (0.5 * eps * gamma) * self.prec * self._coef
        noise_move = self.noise_scale * noise[0]
        if self.track_norms:  # V orthonormal: |V c| = |c|
            self.last_norms = torch.stack([loss_move.norm(), local_move.norm(), noise_move.norm()])
        step = noise_move - loss_move - local_move
        self._coef += step
        torch._foreach_add_(self.params, split_like(step @ self.basis, self.params))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The base state and the tracked span coefficients (a resumed chain continues them bitwise)."""
        state = super().state_dict()
        if self._coef is not None:
            state["span_coefficients"] = self._coef.clone()
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        coef = state.get("span_coefficients")
        self._coef = None if coef is None else coef.to(self.basis).clone()  # None: projected at the next step

    @property
    def apply_root(self) -> RootFn:
        """v -> G^1/2 v = V (sqrt(prec) V^T v) (zero off the span)."""
        root_prec = self.prec.sqrt()

        def root(v: List[torch.Tensor]) -> List[torch.Tensor]:
            flat = torch.cat([t.reshape(-1).to(self.basis.dtype) for t in v])
            return split_like(self.basis.T @ (root_prec * (self.basis @ flat)), v)

        return root


# ---------------------------------------------------------------------------------------------- Rayleigh-Ritz
def _check_rank(sketch: CurvatureSketch, args: BIFArguments, context: SamplerContext) -> None:
    """Warn when the span is much smaller than asked: the chain samples nothing outside it."""
    if sketch.rank < min(args.sketch_rank, context.stream.n) // 2:  # n x outputs bounds the Fisher's rank
        warn_once(
            "subspace-low-rank",
            f"subspace_sgld samples only a {sketch.rank}-dimensional span (sketch_rank={args.sketch_rank}): the "
            "sketch's gradients are nearly linearly dependent (e.g. a full-batch sampler_batch_size with a Task "
            "whose compute_train_loss(sample=True) returns the true-label loss, so every sketch batch gives the "
            "same gradient). Sample targets when sample=True, or lower sampler_batch_size.",
        )


def refine_sketch(sketch: CurvatureSketch, context: SamplerContext) -> CurvatureSketch:
    """The sketch's basis rotated to the Ritz vectors of the mean per-example train-loss Hessian, with its Ritz
    values, on a minibatch of `sampler_batch_size` rows seeded by the run's root seed; the sketch unchanged (one
    log line) where the Task's loss has no double backward."""
    stream = context.stream
    m = min(stream.batch_size, stream.n)
    rows = torch.randperm(stream.n, generator=torch.Generator().manual_seed(context.root_seed ^ _RITZ_SEED))[:m]
    batch = stream.source.gather(rows)
    context.weights.reset()
    try:
        loss = lambda: context.views.summed_train_loss(batch, context.model)  # noqa: E731
        refined = rayleigh_ritz(loss, context.weights.params, sketch, m)
    except Exception as exc:  # noqa: BLE001 - any Task: no double backward means the sketch's eigenvalues
        logger.info(
            "subspace_sgld: Rayleigh-Ritz failed (%s: %s; it needs double backward through the Task's train "
            "loss); sampling with the curvature sketch's own eigenvalues.",
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        return sketch
    kept = positive_curvature(refined)
    logger.info(
        "subspace_sgld: Rayleigh-Ritz on the %d-dimensional sketch span over %d examples: top curvature %.4g "
        "(sketch %.4g); %d Ritz directions with curvature <= 0 dropped from the span.",
        refined.rank,
        m,
        float(refined.eigenvalues[0]),
        float(sketch.eigenvalues[0]),
        refined.rank - kept.rank,
    )
    return kept


def positive_curvature(sketch: CurvatureSketch) -> CurvatureSketch:
    """The Ritz pairs of curvature > 0. Where the loss curves down, the localized posterior is improper or held by
    the localization alone, and a chain there runs away (a model trained short of a minimum): not sampled."""
    positive = sketch.eigenvalues > 0
    if not bool(positive.any()):
        raise ValueError(
            "subspace_sgld: the train loss has no positive curvature on the sketch span at w* (is the model "
            "trained?); use sampler='rmsprop_sgld'."
        )
    return CurvatureSketch(sketch.basis[positive].contiguous(), sketch.eigenvalues[positive], sketch.ritz_rows)


def rayleigh_ritz(
    loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], sketch: CurvatureSketch, batch_size: int
) -> CurvatureSketch:
    """Rayleigh-Ritz of H = Hessian(loss()) / batch_size on span(sketch.basis): k Hessian-vector products (double
    backward), eigh of the k x k V^T H V in float64, the basis rotated to the Ritz vectors (descending values).

    Ritz values may be <= 0 (a true-label Hessian is indefinite off the minimum); they are kept as computed and
    clamped by the sampler. Raises where the loss has no second derivative through autograd.
    """
    basis = sketch.basis
    params = list(params)
    hv = _hessian_rows(loss, params, basis)  # [k, p]: (H v_j)^T, of the summed loss
    projected = gram64(basis, hv) / float(batch_size)
    values, vectors = torch.linalg.eigh(((projected + projected.T) / 2).cpu())
    values, vectors = values.flip(0), vectors.flip(1).to(basis.device)
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError("the Hessian-vector products are not finite")
    rotated = rotate64(vectors.T, basis)
    return CurvatureSketch(basis=rotated, eigenvalues=values.to(sketch.eigenvalues), ritz_rows=batch_size)


def _hessian_rows(loss: Callable[[], torch.Tensor], params: List[torch.Tensor], basis: torch.Tensor) -> torch.Tensor:
    """[k, p]: the Hessian of loss() times each row of `basis` (flattened over `params`), by double backward."""
    with torch.enable_grad(), double_backward():
        grads = torch.autograd.grad(loss(), params, create_graph=True, allow_unused=True)
        flat = torch.cat([_flat_or_zeros(g, p).to(basis.dtype) for g, p in zip(grads, params)])
        if not flat.requires_grad:  # the gradient does not depend on the weights: H = 0
            return torch.zeros_like(basis)
        rows = torch.empty_like(basis)
        for j, v in enumerate(basis):
            second = torch.autograd.grad(flat @ v, params, retain_graph=True, allow_unused=True)
            torch.cat([_flat_or_zeros(h, p).to(basis.dtype) for h, p in zip(second, params)], out=rows[j])
    return rows


def _flat_or_zeros(grad: Optional[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    return torch.zeros(param.numel(), dtype=param.dtype, device=param.device) if grad is None else grad.reshape(-1)
