"""Is the sampler trustworthy? Convergence statistics, warnings for SGLD's known failure modes, and a plot.

Every BIF run writes `bif_diagnostics.json` from `summarize`: per chain, the start loss, mean loss, distances
from w* and the effective sample size of the mean-loss trace; across chains, split R-hat; the preconditioned
sharpness of the loss at w* times the step size; and warnings, each with a code, the chain and what to change:

- `training`: the mean train loss settles well below its value at w* (by 5%, and by more than 3 standard
  errors of its late mean): the chain is optimising, w* is not a local minimum of the tempered loss, or nbeta
  is too large. Common for classifiers near zero loss, whose loss always falls by scaling up the logits.
- `exploding`: the mean train loss climbs far above the larger of its start and the thermal scale
  num_weights / (2 nbeta) that a healthy chain reaches (step too large for the loss surface).
- `flat`: the traces barely move (step too small: the covariances are rounding noise).
- `slow_mixing`: few effective draws (step too small for the number of draws).
- `sharpness`: step_size x the largest preconditioned curvature of the tempered loss (G^1/2 nbeta H G^1/2 on a
  minibatch, after burn-in) is large: discretisation bias, then divergence. (The localization's own limit,
  step_size x localization x max G < 4, is enforced by BIFArguments.)
- `rhat`: chains disagree (more burn-in or draws).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from kronfluence_bif import storage
from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.curvature import double_backward
from kronfluence_bif.samplers import sampler_class
from kronfluence_bif.samplers.base import global_norm
from kronfluence_bif.tables import format_value, text_table

TRAINING_DROP = 0.05  # mean loss below (1 - 5%) of its start
EXPLODING_RATIO = 10.0  # a draw's mean loss above 10x its start
FLAT_RELATIVE_STD = 1e-5  # float32 resolution is ~1e-7: below this the values barely change
SLOW_MIXING_ESS_FRACTION = 0.02  # fewer than 2 effective draws per 100
SHARPNESS_LIMIT = 2.0  # eps * lambda_max: SGLD's variance bias (1 - eps*lambda/4)^-1 reaches 2x there
RHAT_LIMIT = 1.1
# the chains' variance on the span over the quadratic posterior's, beyond which the linear control variate warns
# (the demo MLPs: 1.03 on UCI, 0.94 on digits)
COORDINATE_VARIANCE_RANGE = (0.5, 2.0)
BLOCKING_CODES = ("training", "exploding", "flat", "sharpness")  # what calibration treats as unusable
# float32's spacing next to 1: a loss computed as the float32 log of a number next to 1 is a multiple of it
FLOAT32_SPACING_NEAR_ONE = 2.0**-23
ROUNDED_LOSS_RANGE = (0.0, 1e-5)  # values (exclusive, inclusive] where that rounding dominates a loss
ROUNDED_MIN_COUNT = 20  # small values needed before judging
ROUNDED_FRACTION = 0.9  # of them within ROUNDED_TOLERANCE spacings of a multiple (computed precisely: 0.2%)
ROUNDED_TOLERANCE = 1e-3
LOSS_PRECISION_MESSAGE = (
    "most per-example values below 1e-5 at w* are multiples of 2^-23, float32's spacing next to 1: the Task takes "
    "them as float32 logs of numbers next to 1 (e.g. F.cross_entropy of float32 logits), which knows a confident "
    "example's loss only to about 6e-8, the size of its changes over the draws (on the demo digits MLP this cost "
    "0.03 LDS, and EK-FAC as much). Compute the loss to its own precision: "
    "kronfluence_bif.tasks.precise_cross_entropy(logits, labels, ...), or F.cross_entropy of float64 logits."
)


def float32_rounded(values: torch.Tensor) -> bool:
    """Do the values at w* look like float32 logs of numbers next to 1 (e.g. `F.cross_entropy` of float32 logits)?

    Such a loss is log(1 + j 2^-23) = j 2^-23 - O((j 2^-23)^2): below 1e-5 within 5e-4 spacings of a multiple of
    2^-23, where values computed to their own precision fall there with probability 2e-3. True when at least
    ROUNDED_MIN_COUNT values lie in (0, 1e-5] and ROUNDED_FRACTION of them are that close to a multiple."""
    flat = values.detach().double().reshape(-1)
    low, high = ROUNDED_LOSS_RANGE
    small = flat[(flat > low) & (flat <= high)]
    if small.numel() < ROUNDED_MIN_COUNT:
        return False
    ratio = small / FLOAT32_SPACING_NEAR_ONE
    near = (ratio - ratio.round()).abs() < ROUNDED_TOLERANCE
    return float(near.double().mean()) >= ROUNDED_FRACTION


def effective_sample_size(trace: np.ndarray) -> float:
    """ESS of one chain's trace: N / (1 + 2 sum of autocorrelations), Geyer's initial positive sequence."""
    x = np.asarray(trace, dtype=np.float64)
    n = x.size
    if n < 4:
        return float(n)
    x = x - x.mean()
    var = float(x @ x) / n
    if var <= 0.0:
        return float("nan")
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(x, size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n] / (n * var)
    total = 0.0
    for k in range(0, n - 1, 2):  # Geyer: sums of adjacent autocorrelations, up to the first negative one
        pair = acf[k] + acf[k + 1]
        if pair < 0:
            break
        total += pair
    tau = max(2.0 * total - 1.0, 1.0 / n)
    return float(n / tau)


def split_rhat(traces: np.ndarray) -> float:
    """Split R-hat (Gelman et al. 2013) over chains x draws; nan when it is undefined."""
    x = np.asarray(traces, dtype=np.float64)
    half = x.shape[1] // 2
    if half < 2:
        return float("nan")
    parts = np.concatenate([x[:, :half], x[:, half : 2 * half]], axis=0)
    within = parts.var(axis=1, ddof=1).mean()
    between = half * parts.mean(axis=1).var(ddof=1)
    if within <= 0:
        return float("nan")
    pooled = (half - 1) / half * within + between / half
    return float(math.sqrt(pooled / within))


def pair_means(traces: np.ndarray, antithetic: bool) -> np.ndarray:
    """The traces R-hat compares: with antithetic chains (`BIFArguments.antithetic_chains`) each pair's mean (a
    last unpaired chain as it is), since a mirrored pair's even functions, the mean train loss among them, nearly
    coincide: counted as separate chains they make the between-chain variance look a third smaller than it is."""
    x = np.asarray(traces, dtype=np.float64)
    if not antithetic or x.shape[0] < 2:
        return x
    pairs = (x[0 : x.shape[0] - 1 : 2] + x[1::2]) / 2.0
    return np.concatenate([pairs, x[2 * len(pairs) :]], axis=0)


def summarize(
    traces: Dict[str, torch.Tensor],
    chain_summaries: List[Dict[str, Any]],
    args: BIFArguments,
    sharpness: Optional[float] = None,
    linear_term: Optional[Dict[str, Any]] = None,
    rounded_values: bool = False,
) -> Dict[str, Any]:
    """The content of `bif_diagnostics.json`: statistics and warnings (each with what to change); `linear_term`:
    what the linear control variate did (`SamplingResult.linear_term`); `rounded_values`: the values at w* look
    rounded at float32's resolution next to 1 (`float32_rounded`)."""
    loss = traces["mean_train_loss"].double().numpy()
    warnings: List[Dict[str, Any]] = []
    chains = []
    for summary in chain_summaries:
        c = int(summary["chain"])
        ess = effective_sample_size(loss[c])
        chains.append({**summary, "ess_mean_train_loss": ess})
        start = float(summary["initial_mean_loss"])
        warnings += _chain_warnings(c, loss[c], start, float(summary.get("loss_scale", start)), ess, args)
    rhat = split_rhat(pair_means(loss, bool(args.antithetic_chains))) if loss.shape[0] > 0 else float("nan")
    if math.isfinite(rhat) and rhat > RHAT_LIMIT:
        warnings.append(
            _warning(
                "rhat",
                None,
                f"split R-hat of the mean train loss is {rhat:.3f} > {RHAT_LIMIT}: the chains have not mixed. Raise "
                "`num_burnin_steps` and `num_draws`.",
            )
        )
    sharp = None
    if sharpness is not None and math.isfinite(sharpness):
        product = float(args.step_size) * sharpness
        sharp = {"lambda_max": sharpness, "step_size_times_lambda_max": product}
        if product > SHARPNESS_LIMIT:
            if product < 4.0:
                effect = f"inflates the variance along the sharpest directions by {_inflation(args, product)}"
            else:
                effect = "steps beyond its stability limit of 4 there: the chain does not sample the posterior"
            warnings.append(
                _warning(
                    "sharpness",
                    None,
                    f"step_size x the largest preconditioned curvature of the tempered loss is {product:.3g} > "
                    f"{SHARPNESS_LIMIT:g}: SGLD {effect}. Lower `step_size` below {SHARPNESS_LIMIT / sharpness:.2g}.",
                )
            )
    warnings += _linear_term_warnings(linear_term, args)
    if rounded_values:
        warnings.append(_warning("loss_precision", None, LOSS_PRECISION_MESSAGE))
    report = {"chains": chains, "rhat_mean_train_loss": rhat, "sharpness": sharp, "warnings": warnings}
    if linear_term is not None:
        report["linear_control_variate"] = linear_term
    return report


def _linear_term_warnings(linear_term: Optional[Dict[str, Any]], args: BIFArguments) -> List[Dict[str, Any]]:
    """The linear control variate asked for but off (other than with a minibatch, where the draws' default does
    not count on it), or applied where the chains' spread on the span is far from the quadratic posterior's."""
    if linear_term is None:
        return []
    if not linear_term["applied"]:
        if linear_term["reason"] == "a minibatch gradient":
            return []
        message = (
            f"the linear control variate is off ({linear_term['reason']}), so the draws estimate the BIF's leading "
            f"term too: raise `num_draws` (now {args.num_draws}; 400 without it), or set linear_control_variate=False "
            "to get that default."
        )
        return [_warning("linear_control_variate", None, message)]
    ratio = float(linear_term["coordinate_variance_ratio"])
    low, high = COORDINATE_VARIANCE_RANGE
    if low <= ratio <= high:
        return []
    message = (
        f"the chains' variance on the span is {ratio:.3g}x the quadratic posterior's (outside [{low:g}, {high:g}]): "
        "the potential is far from quadratic there, and the linear control variate moves the scores towards the "
        "quadratic (Laplace) answer. Set linear_control_variate=False and num_draws=400, or a larger localization."
    )
    return [_warning("linear_control_variate", None, message)]


def _inflation(args: BIFArguments, product: float) -> str:
    """SGLD's stationary variance over the target's along a direction where step x curvature = `product`: a sampler
    whose noise is scaled by sqrt(1 - step/4) (exact where step x curvature = step) inflates it less."""
    if sampler_class(args.sampler).exact_linear_variance:
        factor = (1.0 - float(args.step_size) / 4.0) / (1.0 - product / 4.0)
        return f"(1 - {float(args.step_size):.2g}/4) / (1 - {product:.2g}/4) = {factor:.2g}"
    return f"(1 - {product:.2g}/4)^-1"


def merge_module_reports(reports: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One report for a per-module run (one set of chains per module): chains and warnings say their module,
    R-hat and sharpness are the worst module's."""
    chains = [{"module": name, **chain} for name, report in reports.items() for chain in report["chains"]]
    warnings = [
        {**w, "module": name, "message": f"module `{name}`: {w['message']}"}
        for name, report in reports.items()
        for w in report["warnings"]
    ]
    rhats = [r["rhat_mean_train_loss"] for r in reports.values() if math.isfinite(r["rhat_mean_train_loss"])]
    sharp = [r["sharpness"] for r in reports.values() if r["sharpness"] is not None]
    merged = {
        "chains": chains,
        "rhat_mean_train_loss": max(rhats) if rhats else float("nan"),
        "sharpness": max(sharp, key=lambda s: s["step_size_times_lambda_max"]) if sharp else None,
        "warnings": warnings,
        "modules": list(reports),
    }
    linear = {name: r["linear_control_variate"] for name, r in reports.items() if "linear_control_variate" in r}
    if linear:
        merged["linear_control_variate"] = linear
    return merged


def _chain_warnings(
    chain: int, loss: np.ndarray, start: float, loss_scale: float, ess: float, args: BIFArguments
) -> List[Dict]:
    out = []
    n = loss.size
    scale = abs(start) if start != 0 else 1.0
    tail = loss[n // 2 :]
    late = float(tail.mean()) if n else start
    # significant, not just noisy: the drop must exceed 3 standard errors of the late mean (ESS-corrected)
    tail_ess = effective_sample_size(tail) if tail.size >= 4 else float(tail.size)
    stderr = float(tail.std()) / math.sqrt(max(tail_ess if math.isfinite(tail_ess) else tail.size, 1.0))
    if start > 0 and late < (1.0 - TRAINING_DROP) * start and start - late > 3.0 * stderr:
        out.append(
            _warning(
                "training",
                chain,
                f"the mean train loss fell from {start:.4g} at w* to {late:.4g} over the second half of the draws: "
                "the chain is training, so w* is not a minimum of the tempered loss. Train the model further, "
                "lower `nbeta`, or raise `localization`.",
            )
        )
    if loss_scale > 0 and n and float(loss.max()) > EXPLODING_RATIO * loss_scale:
        out.append(
            _warning(
                "exploding",
                chain,
                f"the mean train loss reached {float(loss.max()):.4g}, {float(loss.max()) / loss_scale:.3g}x the "
                f"larger of its value at w* ({start:.4g}) and the thermal scale num_weights / (2 nbeta): lower "
                f"`step_size` (now {args.step_size:g}) or `nbeta`, or raise `localization`.",
            )
        )
    if n > 1 and float(loss.std()) < FLAT_RELATIVE_STD * scale:
        out.append(
            _warning(
                "flat",
                chain,
                f"the mean train loss hardly moves (std {float(loss.std()):.3g} vs {start:.4g}): the scores would be "
                f"rounding noise. Raise `step_size` (now {args.step_size:g}).",
            )
        )
    elif math.isfinite(ess) and n >= 20 and ess < SLOW_MIXING_ESS_FRACTION * n:
        out.append(
            _warning(
                "slow_mixing",
                chain,
                f"only {ess:.1f} effective draws of {n}: raise `step_size` (now {args.step_size:g}) or `num_draws`.",
            )
        )
    return out


def _warning(code: str, chain: Optional[int], message: str) -> Dict[str, Any]:
    where = "all chains" if chain is None else f"chain {chain}"
    return {"code": code, "chain": chain, "message": f"{where}: {message}"}


# ---------------------------------------------------------------------------------------------- sharpness
def preconditioned_sharpness(
    loss_fn,
    params: Sequence[torch.Tensor],
    scale: float,
    localization: float,
    preconditioner: Union[None, Sequence[torch.Tensor], Callable[[List[torch.Tensor]], List[torch.Tensor]]],
    iterations: int = 20,
    generator: Optional[torch.Generator] = None,
    tolerance: float = 1e-3,
) -> float:
    """Largest eigenvalue of A = G^1/2 (scale * Hessian of loss_fn + localization) G^1/2, by Lanczos.

    `loss_fn()` returns the minibatch loss summed over examples; `scale` is nbeta / m. `preconditioner` is a
    diagonal G (list of tensors like `params`), a function v -> G^1/2 v (a full G), or None (G = 1). Each Lanczos
    step is one Hessian-vector product (double backward, about 3 forward passes of one minibatch); at most
    `iterations` steps, fewer once the top Ritz value's residual |A y - theta y| bounds its error by `tolerance` of
    itself (0: all `iterations`). The result is a Ritz value, so it is never above lambda_max.

    Lanczos, not power iteration: with G = 1 the localization adds gamma to every eigenvalue, which leaves the
    Krylov space, and so Lanczos, unchanged, while power iteration converges at the ratio
    (gamma + s lambda_2) / (gamma + s lambda_1), near 1 when the shift dominates: on the demo UCI MLP (plain SGLD,
    nbeta 100, localization 1e3) a stop on a 1e-3 change of the power iterate gave 1001 against 2374.
    """
    params = list(params)
    with torch.enable_grad(), double_backward():  # the graph of the first backward is differentiated again
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    if preconditioner is None:
        apply_root = list
    elif callable(preconditioner):
        apply_root = preconditioner
    else:
        root = [g.sqrt() for g in preconditioner]
        apply_root = lambda v: torch._foreach_mul(v, root)  # noqa: E731

    def apply(v: List[torch.Tensor]) -> List[torch.Tensor]:
        w = apply_root(v)  # G^1/2 v
        hv = torch.autograd.grad(grads, params, grad_outputs=w, retain_graph=True)
        av = torch._foreach_mul(list(hv), scale)
        torch._foreach_add_(av, w, alpha=localization)
        return [a.detach() for a in apply_root(av)]

    start = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
    return _lanczos_top(apply, start, iterations, tolerance)


def _lanczos_top(
    apply: Callable[[List[torch.Tensor]], List[torch.Tensor]], start: List[torch.Tensor], steps: int, tolerance: float
) -> float:
    """The top Ritz value of the symmetric operator `apply` after at most `steps` Lanczos steps from `start`
    (no reorthogonalization: the extreme Ritz value converges first and is unaffected by ghost copies); stops once
    the top pair's residual is at most `tolerance` of its value."""
    q = torch._foreach_div(start, global_norm(start))
    previous: Optional[List[torch.Tensor]] = None
    alphas: List[float] = []
    betas: List[float] = []
    value = 0.0
    for _ in range(steps):
        w = apply(q)
        alpha = float(sum((a * b).sum() for a, b in zip(w, q)))
        torch._foreach_add_(w, q, alpha=-alpha)
        if betas:  # from the second step: the three-term recurrence
            torch._foreach_add_(w, previous, alpha=-betas[-1])
        beta = float(global_norm(w))
        alphas.append(alpha)
        values, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        value = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1]))  # |A y - theta y| of the top Ritz pair
        if residual <= tolerance * abs(value) or beta <= 1e-12 * max(abs(value), 1e-30):
            break  # converged, or the Krylov space is invariant (exact)
        betas.append(beta)
        previous, q = q, torch._foreach_div(w, beta)
    return value


def _tridiagonal(alphas: List[float], betas: List[float]) -> torch.Tensor:
    """The Lanczos matrix T: `alphas` on the diagonal, `betas` beside it (float64)."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)  # one fewer than alphas
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


# ---------------------------------------------------------------------------------------------- plot
def plot_traces(traces: Dict[str, torch.Tensor], path: Union[str, Path], title: str = "") -> Path:
    """A PNG with one panel per trace and one line per chain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(traces)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = traces[name].double().numpy()
        for c, row in enumerate(values):
            taken = np.flatnonzero(np.isfinite(row))  # step traces are taken at every few draws only
            ax.plot(taken, row[taken], lw=0.8, label=f"chain {c}")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("draw", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if names and traces[names[0]].shape[0] <= 8:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- report
# Traces printed first, in this order; any other [num_chains, num_draws] trace follows.
MAIN_TRACES = ("mean_train_loss", "mean_measurement")


def format_diagnostics(folder: Union[str, Path]) -> str:
    """Per-chain summaries (`bif_diagnostics.json`) and per-chain means of the traces (`bif_traces.safetensors`).

    The text of `kronfluence-bif diagnose`; raises ValueError when `folder` holds neither file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"no such folder `{folder}`; pass a `scores_<name>` folder written with strategy 'bif'.")
    diagnostics_path, traces_path = folder / storage.BIF_DIAGNOSTICS_FILE, folder / storage.BIF_TRACES_FILE
    if not diagnostics_path.exists() and not traces_path.exists():
        raise ValueError(
            f"`{folder}` holds neither {storage.BIF_DIAGNOSTICS_FILE} nor {storage.BIF_TRACES_FILE}: only scores "
            "computed with strategy 'bif' have sampling diagnostics (EK-FAC folders do not)."
        )
    lines = [f"BIF sampling diagnostics of {folder}"]
    if diagnostics_path.exists():
        lines += _report_lines(storage.load_json(diagnostics_path))
    else:
        lines.append(f"({storage.BIF_DIAGNOSTICS_FILE} is missing)")
    if traces_path.exists():
        lines += _trace_lines(storage.load_tensors(traces_path))
    else:
        lines.append(f"({storage.BIF_TRACES_FILE} is missing)")
    return "\n".join(lines)


def _linear_term_lines(term: Optional[Dict[str, Any]]) -> List[str]:
    """What the linear control variate did (a dict per module for per-module runs; nothing when not asked for)."""
    if not term:
        return []
    if "applied" not in term:  # per-module runs: {module: term}
        return [line for name, t in term.items() for line in _linear_term_lines(t and {**t, "module": name})]
    where = f" (module `{term['module']}`)" if "module" in term else ""
    if not term["applied"]:
        return [f"Linear control variate{where}: off ({term['reason']})"]
    ratio = format_value(float(term["coordinate_variance_ratio"]))
    low, high = COORDINATE_VARIANCE_RANGE
    return [
        f"Linear control variate{where}: on a {term['span_rank']}-dimensional span; the chains' variance there is "
        f"{ratio}x the quadratic posterior's (fine in [{low:g}, {high:g}])"
    ]


def _report_lines(report: Dict[str, Any]) -> List[str]:
    """R-hat, the step-size/curvature check, the warnings and a table of the per-chain summaries."""
    lines = []
    chains = report.get("chains", [])
    rhat, sharp = report.get("rhat_mean_train_loss"), report.get("sharpness")
    if rhat is not None:
        lines.append(f"Split R-hat of the mean train loss: {format_value(float(rhat))} (fine below 1.1)")
    if sharp:
        lines.append(
            f"step_size x largest preconditioned curvature: {format_value(sharp['step_size_times_lambda_max'])} "
            "(fine below 2)"
        )
    lines.extend(_linear_term_lines(report.get("linear_control_variate")))
    warnings = report.get("warnings", [])
    lines.append(f"Warnings: {len(warnings)}" + ("" if warnings else " (none)"))
    lines.extend(f"  [{w['code']}] {w['message']}" for w in warnings)
    keys: List[str] = []
    for summary in chains:
        keys.extend(key for key in summary if key not in keys)
    lines.append("")
    lines.append(f"Per-chain summaries ({storage.BIF_DIAGNOSTICS_FILE}, {len(chains)} chains):")
    rows = [[summary.get(key, "-") for key in keys] for summary in chains]
    lines.extend("  " + line for line in text_table(keys, rows) if keys)
    return lines


def _trace_lines(traces: Dict[str, torch.Tensor]) -> List[str]:
    """A table of each chain's mean over draws of every [num_chains, num_draws] trace (none: no lines); the step
    traces, taken at every STEP_TRACE_INTERVAL-th draw (NaN at the others), average over the draws they hold."""
    names = [n for n in MAIN_TRACES if n in traces] + sorted(n for n in traces if n not in MAIN_TRACES)
    names = [n for n in names if traces[n].ndim == 2]
    if not names:
        return []
    num_chains, num_draws = traces[names[0]].shape
    means = {n: torch.nanmean(traces[n].double(), dim=1).tolist() for n in names}
    rows = [[c] + [means[n][c] if c < len(means[n]) else "-" for n in names] for c in range(num_chains)]
    title = f"Per-chain means over draws ({storage.BIF_TRACES_FILE}, {num_chains} chains x {num_draws} draws):"
    return ["", title] + ["  " + line for line in text_table(["chain"] + names, rows)]
