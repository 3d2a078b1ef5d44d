"""`BIFArguments`: the sampler settings of the local Bayesian influence function."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kronfluence_bif.samplers import SAMPLERS, sampler_class  # the registry: name -> Sampler class

# fields that change how a run is executed, not its result: a rerun may change them (e.g. to resume differently)
RUN_CONTROL_FIELDS = (
    "checkpoint_interval",
    "keep_checkpoints",
    "cache_batches",
    "num_threads",
    "step_diagnostics",
    "batch_chains",
    "compile_evaluation",
)


AUTO_SAMPLER = "auto"  # BIFArguments.sampler's default: chosen per run by `BIFArguments.resolved`
AUTO_SPAN_BYTES = 1 << 30  # "auto" takes subspace_sgld while its span basis (sketch_rank x weights, fp32) fits
AUTO_FULL_BATCH_RATIO = 2  # full batch while the posterior's examples are at most this many times those evaluated
AUTO_MINIBATCH = 64  # ... else this minibatch, with the control variate (the tiny GPT-2: 1803 vs 136 sequences)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class BIFArguments:
    """Settings of the SGLD sampling phase that replaces EK-FAC's fit and score phases.

    The posterior is the localized, tempered posterior around the trained weights w*::

        p(w) ~ exp(-nbeta * mean_i loss_i(w) - localization/2 * |w - w*|^2)

    sampled by preconditioned SGLD::

        w <- w - step_size/2 * G (nbeta/m * sum_batch grad loss + localization*(w - w*)) + N(0, step_size * G)

    with G = I (`sgld`), a diagonal RMSprop G (`rmsprop_sgld`), G = (nbeta F_K + localization I)^-1 with F_K a
    low-rank Fisher sketch at w* (`sketch_sgld`), or the sketch's span only with Rayleigh-Ritz curvatures
    (`subspace_sgld`). A fixed G leaves the target posterior unchanged.

    Under a Laplace approximation, ``Cov(loss_i, f_q) ~= g_q^T (nbeta * H_mean + localization * I)^-1 g_i``:
    kronfluence's damped influence function divided by ``nbeta`` with damping ``localization / nbeta``.

    How the defaults were chosen (README, "Defaults"; BENCHMARKS.md; `benchmarks/defaults_quality.py`,
    `benchmarks/linear_control_variate.py`): LDS against retraining on random halves and agreement with kronfluence
    EK-FAC on the UCI concrete MLP (8-128-128-128-1) and a scikit-learn digits MLP (64-128-128-10). `sampler="auto"`
    takes `subspace_sgld` where its span fits: the full-batch gradient, the temperature pilot's nbeta / localization,
    the linear control variate, antithetic chain pairs, 4 chains x 100 draws (UCI LDS 0.333-0.341 on three seeds
    against EK-FAC's 0.290, digits 0.96-1.00x of EK-FAC). Elsewhere RMSprop-SGLD, frozen after burn-in, step 3e-4,
    nbeta 1e3, localization 1e3, m 64, 4 x 400 draws.
    """

    sampler: str = _help(
        "`auto` (the default: `subspace_sgld` when its span fits, sketch_rank x the number of sampled weights x 4 "
        "bytes <= 1 GiB, and `sampler_batch_size` is unset, with the full batch while train_dataset <= 2 x the "
        "scored train and query examples (it then costs about what the draws evaluate anyway), else a minibatch of "
        "64 with the control variate; otherwise `rmsprop_sgld`. Resolved per run, logged, and recorded in "
        "bif_diagnostics.json), "
        "`subspace_sgld` (SGLD on the span of a low-rank Fisher sketch at w*, with Rayleigh-Ritz eigenvalues, a "
        "full-batch gradient and the drift centred at w*), `sketch_sgld` (SGLD preconditioned by (nbeta F_K + "
        "localization)^-1), `rmsprop_sgld` (diagonal RMSprop preconditioner, Li et al. 2016) or `sgld`; any name "
        "registered with `kronfluence_bif.samplers.register_sampler`.",
        default=AUTO_SAMPLER,
    )
    num_chains: int = _help("Number of independent chains (C in the paper).", default=4)
    num_draws: Optional[int] = _help(
        "Draws kept per chain (T in the paper). None: the sampler's default (subspace_sgld 100 with its full-batch "
        "gradient: its linear control variate takes the BIF's leading term exactly, so the draws only estimate the "
        "rest; 400 for the others and for subspace_sgld with a set sampler_batch_size).",
        default=None,
    )
    num_burnin_steps: Optional[int] = _help(
        "SGLD steps discarded at the start of each chain (b in the paper). None: the sampler's default "
        "(subspace_sgld 20, the others 100).",
        default=None,
    )
    draw_interval: int = _help("SGLD steps between two kept draws (thinning).", default=1)
    step_size: Optional[float] = _help(
        "SGLD step size epsilon; None: the sampler's default (sketch_sgld 0.25 and subspace_sgld 1.0, which are "
        "dimensionless since their preconditioner ~ the inverse curvature; sgld and rmsprop_sgld 3e-4). Its scale "
        "is the sampler's, so setting it needs an explicit `sampler`.",
        default=None,
    )
    nbeta: Optional[float] = _help(
        "Effective sample size times inverse temperature (n*beta). None: the sampler's default (subspace_sgld 1e5, "
        "the others 1e3), or the temperature pilot's choice (`calibrate_temperature`).",
        default=None,
    )
    localization: Optional[float] = _help(
        "Strength gamma of the pull towards w* (plays the role of damping, localization / nbeta). None: the "
        "sampler's default (1e3), or the temperature pilot's choice (`calibrate_temperature`).",
        default=None,
    )
    calibrate_temperature: Optional[bool] = _help(
        "Choose (nbeta, localization) per run by a temperature pilot: short chains from w* on the sampler's ladder "
        "(subspace_sgld: 1e4 / 1e2, then 3e4 / 3e2, hotter at damping 0.01, then 3e5 / 1e3, damping 3e-3), in that "
        "order; the first whose losses stay finite and near their equilibrium rise is taken, else the sampler's "
        "defaults (1e5 / 1e3). A hotter or less damped posterior predicts retraining better where it stays stable "
        "(README, Defaults). Logged; the chosen values "
        "are in bif_diagnostics.json's sampler_arguments. None: True when neither nbeta nor localization is set; "
        "samplers without a ladder ignore it (False).",
        default=None,
    )
    sampler_batch_size: Optional[int] = _help(
        "Minibatch size m of the SGLD gradient (its noise grows with nbeta^2 / m: cold chains need large m). None: "
        "the sampler's default (subspace_sgld the whole training set, the others 64).",
        default=None,
    )
    center_gradient: Optional[bool] = _help(
        "Drive the chains by grad L(w) - grad L(w*) (one full pass over the training set at w* per run), so w* is a "
        "stationary point of the sampled potential, as the local BIF assumes: a w* trained short of a minimum "
        "otherwise pulls a tight posterior towards the minimum nearby, where the curvature differs (README, "
        "Defaults). None: the sampler's default (subspace_sgld True, the others False).",
        default=None,
    )
    control_variate: Optional[bool] = _help(
        "Minibatch gradients with the SGLD-CV control variate (Baker et al. 2019): the minibatch's gradient at w* "
        "is subtracted and the full-batch gradient at w* added, so the gradient noise is that of g(w) - g(w*), "
        "which vanishes at w*, instead of the spread of the per-example gradients (the noise that grows with "
        "nbeta^2 / m). Costs one more forward and backward of the minibatch per step and one full pass at w* per "
        "run; nothing with a full-batch sampler_batch_size, where it is exactly zero. None: the sampler's default "
        "(subspace_sgld True, the others False).",
        default=None,
    )
    linear_control_variate: Optional[bool] = _help(
        "For chains that move on a span (subspace_sgld): take the covariance of each evaluated value's linear part on "
        "the span, J c, from the quadratic posterior the chain samples there instead of from the draws (scores = "
        "Cov_draws(x, y) - J_y C J_x^T + J_y diag(1 / (nbeta s + localization)) J_x^T, C the draws' covariance of "
        "c), so only the rest of the BIF is Monte Carlo. J by central secants at +-sqrt(3) posterior standard "
        "deviations along each of the k directions: 2k evaluations at w* per run, split over the processes' chain "
        "groups (again per column block), and (n + q) x k float64 (columns: tokens for per-token scores). Needs the "
        "chain's Ritz values on the full batch (else off, logged and recorded in bif_diagnostics.json). None: the "
        "sampler's default (subspace_sgld True); samplers that move every weight ignore it (False).",
        default=None,
    )
    antithetic_chains: Optional[bool] = _help(
        "Pair the chains antithetically: chain 2j + 1 draws chain 2j's noise negated (and its minibatches), so where "
        "the drift is linear it is chain 2j reflected through w*. Each chain alone is still exact; the pair cancels "
        "the odd-order parts of the values (one value's linear part times another's quadratic part) in the pooled "
        "moments, the larger part of the Monte-Carlo error the linear control variate leaves, while the even-order "
        "parts get half as many independent draws. Chains remain a function of (seed, chain). None: the sampler's "
        "default (subspace_sgld True with its linear control variate, else False).",
        default=None,
    )
    normalize: bool = _help("Pearson correlation instead of covariance (the paper's normalized BIF).", default=False)
    seed: int = _help("Base seed; chain c is seeded by (seed, c), independent of the number of processes.", default=0)
    rmsprop_alpha: float = _help("EMA decay of the squared-gradient average of RMSprop-SGLD.", default=0.99)
    rmsprop_eps: float = _help("Offset of RMSprop-SGLD's preconditioner 1/(rmsprop_eps + sqrt(V)).", default=0.1)
    freeze_preconditioner: bool = _help(
        "Freeze RMSprop-SGLD's preconditioner after burn-in (an adapting one biases the covariance).", default=True
    )
    divergence_loss_ratio: float = _help(
        "Stop with an error when a draw's mean train loss exceeds this multiple of the larger of its value at w* and "
        "the thermal scale num_sampled_weights / (2 nbeta).",
        default=1000.0,
    )
    draws_per_block: int = _help("Draws buffered before one float64 GEMM updates the moments.", default=32)
    cache_batches: bool = _help(
        "Collate the train/query datasets once and keep the tensors on the device (fast for data that fits).",
        default=True,
    )
    checkpoint_interval: int = _help(
        "Checkpoint each chain every this many draws (at the next block boundary) into the scores folder, so a "
        "killed run resumes there; 0 disables checkpoints.",
        default=100,
    )
    token_by_token: bool = _help(
        "With per-token scores, also write the full token-by-token matrix [n_query, T_query, n_train, T_train] "
        "(bif_token_scores.safetensors) when the Task defines compute_per_token_measurement.",
        default=True,
    )
    sampled_modules: Optional[List[str]] = _help(
        "Sample only the parameters whose name (or module name) matches one of these fnmatch patterns, e.g. "
        "['*.attn.*'] for attention only; any module type (Conv1D, LayerNorm, Embedding). None: the Task's tracked "
        "modules, else every parameter.",
        default=None,
    )
    moment_memory_gb: float = _help(
        "Budget for the float64 cross-moment sums on the device. Pairwise runs whose [dim_query, dim_train] sums "
        "exceed it (e.g. per-token scores) run in blocks of training columns, re-running the identical chains for "
        "each block (time grows, memory does not).",
        default=4.0,
    )
    sketch_rank: Optional[int] = _help(
        "Number K of minibatch gradients in sketch_sgld's and subspace_sgld's curvature sketch (its rank; "
        "subspace_sgld's span dimension): of the Task's Gaussian compute_fisher_probe where it has one, else of "
        "its sampled-label loss. Memory: K x the number of sampled weights in float32; cost: K backward passes of "
        "one minibatch, once per run. None: the sampler's default (subspace_sgld 256, sketch_sgld 128).",
        default=None,
    )
    keep_checkpoints: bool = _help(
        "Keep the checkpoints after the final scores are written (they are removed by default).", default=False
    )
    num_threads: Optional[int] = _help(
        "Intra-op CPU threads while sampling (the caller's count is restored after). None: an explicit "
        "OMP_NUM_THREADS or torch.set_num_threads is kept; otherwise models with small matrix products sample on one "
        "thread (as fast alone, and no collapse when other processes share the cores), larger ones on torch's count "
        "but at most the cores idle when sampling starts.",
        default=None,
    )
    step_diagnostics: bool = _help(
        "Trace the step norms (gradient, localization, noise moves) and distance from w* for the "
        "diagnostics. False skips that per-draw work (for benchmarking): the scores and the loss-based diagnostics "
        "(R-hat, ESS, divergence) are unchanged; the step traces and the chains' distances from w* read NaN / null.",
        default=True,
    )
    batch_chains: Optional[bool] = _help(
        "Advance this process's chains in lockstep and evaluate all of them in one batched forward per batch "
        "(torch.func.vmap over their stacked weights): the same chains, to float rounding. Chains that resume from a "
        "checkpoint, evaluation groups, uncached data, low-precision weights and models vmap cannot batch run one "
        "at a time. False (the default until a GPU measurement shows the gain: on CPU the batched products were "
        "slower, BENCHMARKS.md): never; None: on CUDA devices only; True: wherever it applies.",
        default=False,
    )

    compile_evaluation: bool = _help(
        "Compile the per-example (per-token) evaluation views with torch.compile (inductor, one graph per batch "
        "shape, compiled at the evaluation at w*). Measured (BENCHMARKS.md): 2.2x faster evaluation on a tiny GPT-2 "
        "after 17 s of compilation (worth it from about 100 draws), 0.9x on a small MLP. Values change in the last "
        "float bits. Where compilation fails (e.g. no C++ compiler on CPU) one warning is logged and the views run "
        "eagerly; chains in lockstep (batch_chains) evaluate eagerly.",
        default=False,
    )

    def __post_init__(self) -> None:
        # a field left None takes the sampler's default (sketch-SGLD's step is dimensionless, the others' are not);
        # with sampler="auto" they stay None until `resolved` knows the model
        if self.calibrate_temperature is None:  # decided before the defaults fill nbeta and localization
            self.calibrate_temperature = self.nbeta is None and self.localization is None
        if self.sampler in SAMPLERS and not SAMPLERS[self.sampler].temperature_ladder:
            self.calibrate_temperature = False
        if self.sampler in SAMPLERS and not SAMPLERS[self.sampler].samples_on_span:
            if self.linear_control_variate in (None, True, False):  # an invalid value is left for `validate`
                self.linear_control_variate = False
        if self.sampler in SAMPLERS:
            self._fill_defaults()
        self.validate()

    def _fill_defaults(self) -> None:
        cls = SAMPLERS[self.sampler]
        if self.step_size is None:
            self.step_size = cls.default_step_size
        for name, value in cls.argument_defaults(self).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def resolved(self, num_weights: int, num_train: int = 0, num_evaluated: int = 0) -> BIFArguments:
        """These arguments with `sampler="auto"` resolved (and the fields left None set to that sampler's defaults)
        for a run over `num_weights` sampled weights whose posterior has `num_train` examples, of which the draws
        evaluate `num_evaluated` (train and query); themselves when the sampler is explicit.

        subspace_sgld where its span basis fits in `AUTO_SPAN_BYTES` and `sampler_batch_size` is unset (a minibatch
        size set by the user means RMSprop-SGLD's minibatch sampler), else rmsprop_sgld. Its gradient is the full
        batch while that costs at most about what every draw evaluates anyway (num_train <= AUTO_FULL_BATCH_RATIO x
        num_evaluated), else a minibatch of AUTO_MINIBATCH with the control variate (subspace_sgld's default;
        the full batch where the training set is no larger).
        Without the counts (0, 0) the full batch is taken as affordable.
        """
        if self.sampler != AUTO_SAMPLER:
            return self
        rank = self.sketch_rank or SAMPLERS["subspace_sgld"].defaults["sketch_rank"]
        fits = rank * int(num_weights) * 4 <= AUTO_SPAN_BYTES
        if not fits or self.sampler_batch_size is not None:
            return dataclasses.replace(self, sampler="rmsprop_sgld")
        affordable = int(num_train) <= AUTO_FULL_BATCH_RATIO * int(num_evaluated)
        batch = None if affordable or int(num_train) <= AUTO_MINIBATCH else AUTO_MINIBATCH  # None: the full batch
        return dataclasses.replace(self, sampler="subspace_sgld", sampler_batch_size=batch)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its allowed range."""
        self._check_sampler()
        for name in ("num_chains", "draw_interval", "draws_per_block"):
            _check_int(name, getattr(self, name), minimum=1)
        for name, minimum in (("num_draws", 1), ("sampler_batch_size", 1), ("sketch_rank", 1), ("num_burnin_steps", 0)):
            if getattr(self, name) is not None:  # None: the sampler's default (resolved with the model)
                _check_int(name, getattr(self, name), minimum=minimum)
        _check_int("seed", self.seed, minimum=0)
        _check_int("checkpoint_interval", self.checkpoint_interval, minimum=0)
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ValueError(
                f"BIFArguments.num_threads must be None (choose automatically) or an integer >= 1, got "
                f"{self.num_threads!r}."
            )
        if self.batch_chains is not None and not isinstance(self.batch_chains, bool):
            raise ValueError(
                "BIFArguments.batch_chains must be None (on CUDA devices only), True or False, got "
                f"{self.batch_chains!r}."
            )
        if self.num_draws is not None and self.num_chains * self.num_draws < 2:
            raise ValueError(
                "BIFArguments needs at least 2 draws in total (num_chains * num_draws >= 2) to estimate a covariance, "
                f"got num_chains={self.num_chains}, num_draws={self.num_draws}."
            )
        if self.sampler != AUTO_SAMPLER:
            _check_float("step_size", self.step_size, low=0.0, hint="typical values are 1e-6 to 1e-3")
        if self.nbeta is not None:
            _check_float("nbeta", self.nbeta, low=0.0, hint="typical values are 10 to 1e6")
        if self.localization is not None:
            _check_float("localization", self.localization, low=0.0, allow_zero=True, hint="typical values 10 to 1e4")
        _check_float("rmsprop_eps", self.rmsprop_eps, low=0.0, hint="typical values 1e-8 to 1")
        _check_float("moment_memory_gb", self.moment_memory_gb, low=0.0, hint="e.g. 4")
        _check_float("divergence_loss_ratio", self.divergence_loss_ratio, low=1.0, hint="e.g. 1000")
        self._check_stability()
        if self.sampled_modules is not None and (
            isinstance(self.sampled_modules, str)
            or not all(isinstance(p, str) and p for p in self.sampled_modules)
            or not self.sampled_modules
        ):
            raise ValueError(
                "BIFArguments.sampled_modules must be None or a non-empty list of name patterns such as ['*.attn.*'], "
                f"got {self.sampled_modules!r}."
            )
        if not (isinstance(self.rmsprop_alpha, (int, float)) and 0.0 < float(self.rmsprop_alpha) < 1.0):
            raise ValueError(f"BIFArguments.rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha!r}.")
        self._check_flags()

    def _check_flags(self) -> None:
        for name in (
            "normalize",
            "freeze_preconditioner",
            "cache_batches",
            "keep_checkpoints",
            "token_by_token",
            "step_diagnostics",
            "compile_evaluation",
            "calibrate_temperature",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BIFArguments.{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("center_gradient", "control_variate", "linear_control_variate", "antithetic_chains"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(
                    f"BIFArguments.{name} must be None (the sampler's default), True or False, got {value!r}."
                )

    def _check_sampler(self) -> None:
        """A registered sampler or "auto"; with "auto" the step size, whose scale is the sampler's, stays unset."""
        if self.sampler != AUTO_SAMPLER:
            sampler_class(self.sampler)  # ValueError naming the registered samplers
        elif self.step_size is not None:
            raise ValueError(
                f"BIFArguments.step_size={self.step_size!r} needs an explicit `sampler`: its scale is the sampler's "
                "(dimensionless, about 1, for subspace_sgld and sketch_sgld; about 3e-4 for sgld and rmsprop_sgld). "
                "Set e.g. sampler='rmsprop_sgld' with it, or leave step_size=None."
            )

    def _check_stability(self) -> None:
        """The sampler's own limits (e.g. the localization term alone must not diverge: step x gamma x max G < 4),
        declared by each sampler class (`Sampler.check_arguments`); checked once "auto" is resolved."""
        if self.sampler != AUTO_SAMPLER:
            sampler_class(self.sampler).check_arguments(self)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_str_dict(self) -> Dict[str, str]:
        return {k: str(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> BIFArguments:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown BIFArguments fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def field_help(cls) -> Dict[str, str]:
        """Each field's help text, by name (README's BIFArguments table is checked against it)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"BIFArguments.{name} must be an integer >= {minimum}, got {value!r}.")


def _check_float(name: str, value: Any, low: float, hint: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) >= low if allow_zero else float(value) > low)
    if not ok:
        relation = ">=" if allow_zero else ">"
        raise ValueError(f"BIFArguments.{name} must be a finite number {relation} {low:g} ({hint}), got {value!r}.")
