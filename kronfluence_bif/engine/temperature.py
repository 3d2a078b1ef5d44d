"""The temperature pilot: the first stable (nbeta, localization) of a sampler's ladder, by short chains from w*.

At a fixed damping localization / nbeta, a hotter posterior (nbeta and localization lowered together) weighs the
BIF's second-order term more and predicts retraining better: on the demo UCI MLP, subspace-SGLD at nbeta 1e4 /
localization 1e2 scores LDS 0.347 / 0.218 (retrain fractions 0.5 / 0.1) against 0.307 / 0.159 at 1e5 / 1e3; and at
a fixed localization a lower damping does on the digits MLP (3e5 / 1e3: 0.433 / 0.418 on two seeds at fraction 0.5
against 0.392 / 0.386; BENCHMARKS.md, "The defaults"). But where the curvature grows quickly away from w*, the wider
draws of a small localization leave the basin within a few steps: digits at 3e4 / 3e2 (step 10), UCI at 1e4 / 30
(step 9). Which rung is stable is a property of the model (and of the chains' noise: digits at 3e4 / 3e2 diverges
in some chains and not in others), so it is measured: `choose_temperature` runs, per rung in the ladder's order,
the first burn-in + `PILOT_STEPS` steps of every chain, seeded exactly as the run seeds them, and keeps the first
rung where every chain's losses stay finite and their mean rise over w* in the second half stays within
`RISE_RATIO` times the rise a quadratic posterior settles at (`Sampler.equilibrium_rise`); if no rung passes, the
sampler's defaults, their step lowered where the first chain's sharpness after its burn-in would make the run warn
(`_fitted_step`). A run at the chosen rung repeats the pilot's steps exactly, so it cannot diverge within them.
Each process pilots its own chains and the verdicts are gathered, so every process (and a resumed run) takes the
same rung. Its cost: (burn-in + PILOT_STEPS) gradient steps per chain and rung tried, once per run (an unstable
chain stops the rung).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.diagnostics import SHARPNESS_LIMIT
from kronfluence_bif.engine.guards import probe_sharpness
from kronfluence_bif.engine.seeds import chain_sampler, stream_generator
from kronfluence_bif.logs import logger
from kronfluence_bif.samplers import sampler_class

if TYPE_CHECKING:
    from kronfluence_bif.engine.engine import SamplingEngine

PILOT_STEPS = 40  # steps after the burn-in; the rise is measured over the second half of all pilot steps
RISE_RATIO = 4.0  # a rise above this many equilibrium rises is a chain leaving the quadratic basin
STEP_MARGIN = 0.9  # a too-sharp fallback's step: this fraction of the largest step its sharpness allows


def choose_temperature(engine: SamplingEngine) -> BIFArguments:
    """The engine's arguments with nbeta and localization set by the pilot (themselves when it does not apply)."""
    args = engine.args
    ladder = sampler_class(args.sampler).temperature_ladder
    if not args.calibrate_temperature or not ladder:
        return args
    chains = engine.state.plan(args.num_chains).chains  # this process's chains; the others pilot theirs
    for nbeta, localization in ladder:
        candidate = dataclasses.replace(args, nbeta=nbeta, localization=localization)
        verdicts = engine.state.all_gather_object(_safe_pilot(engine, candidate, chains))
        verdict = Verdict.worst(verdicts)
        logger.info("Temperature pilot: nbeta %g, localization %g: %s.", nbeta, localization, verdict.describe())
        if verdict.stable:
            return candidate
    logger.info(
        "Temperature pilot: no rung of the ladder was stable; sampling at the sampler's defaults (nbeta %g, "
        "localization %g).",
        args.nbeta,
        args.localization,
    )
    return _fitted_step(engine, args, chains[0])


def _fitted_step(engine: SamplingEngine, args: BIFArguments, chain: int) -> BIFArguments:
    """The fallback, with its step lowered to STEP_MARGIN of what its sharpness allows where step x sharpness after
    the first chain's burn-in would exceed the diagnostics' limit: the `sharpness` warning's own fix, so the
    defaults do not warn (digits seed 1: 2.54 at step 1.0; at 0.7 no warning and LDS 0.361 against 0.362)."""
    probes = engine.state.all_gather_object(_safe_probe(engine, args, chain))
    found = [v for v in probes if v is not None]
    if not found or max(found) <= SHARPNESS_LIMIT:
        return args
    step = float(args.step_size) * STEP_MARGIN * SHARPNESS_LIMIT / max(found)
    logger.info(
        "Temperature pilot: at the defaults step x sharpness is %.3g > %g; sampling with step_size %.3g.",
        max(found),
        SHARPNESS_LIMIT,
        step,
    )
    return dataclasses.replace(args, step_size=step)


def _safe_probe(engine: SamplingEngine, args: BIFArguments, chain: int) -> Optional[float]:
    """step x sharpness after `chain`'s burn-in at `args` (None where it cannot be measured, or on an error: every
    process must reach the gather)."""
    try:
        return _pilot_chain(engine, args, chain, probe=True, probe_only=True)[2]
    except Exception as exc:  # noqa: BLE001 - the run meets the same error and reports it properly
        logger.info("Temperature pilot: the sharpness probe at the defaults failed (%s: %s).", type(exc).__name__, exc)
        return None


@dataclass
class Verdict:
    """What a rung's pilot chains showed: the largest mean loss rise over w* (NaN: not measurable), its limit, and
    step_size x the preconditioned sharpness after the first chain's burn-in (None: not measured)."""

    rise: float = math.nan
    limit: float = math.inf
    sharpness: Optional[float] = None

    @property
    def stable(self) -> bool:
        """Finite losses, a rise within its limit, and no `sharpness` warning to come (the diagnostics' limit)."""
        rise_ok = math.isnan(self.rise) or (math.isfinite(self.rise) and self.rise <= self.limit)
        return rise_ok and (self.sharpness is None or self.sharpness <= SHARPNESS_LIMIT)

    def describe(self) -> str:
        sharp = "" if self.sharpness is None else f", step x sharpness {self.sharpness:.3g} (limit {SHARPNESS_LIMIT:g})"
        what = "stable" if self.stable else "unstable"
        return f"{what} (mean loss rise over w* {self.rise:.3g}, limit {self.limit:.3g}{sharp})"

    @staticmethod
    def worst(verdicts: Sequence[Verdict]) -> Verdict:
        """Chains' or processes' verdicts as one: the largest rise and sharpness, the smallest limit."""
        sharp = [v.sharpness for v in verdicts if v.sharpness is not None]
        return Verdict(
            rise=functools.reduce(_larger, [v.rise for v in verdicts]),
            limit=min(v.limit for v in verdicts),
            sharpness=max(sharp) if sharp else None,
        )


def _safe_pilot(engine: SamplingEngine, args: BIFArguments, chains: Sequence[int]) -> Verdict:
    """`pilot`, with an error failing the rung instead of escaping: every process must reach the gather (or the
    others would wait for it), and the run itself meets the same error where it reports it properly."""
    try:
        return pilot(engine, args, chains)
    except Exception as exc:  # noqa: BLE001 - reported by the run at the rung it falls back to
        logger.info("Temperature pilot: nbeta %g failed (%s: %s).", args.nbeta, type(exc).__name__, exc)
        return Verdict(rise=math.inf)


def pilot(engine: SamplingEngine, args: BIFArguments, chains: Sequence[int]) -> Verdict:
    """The verdict of the first burn-in + PILOT_STEPS steps of `chains` with `args`, seeded as the run seeds them
    (so a run at a stable rung repeats these steps exactly); the sharpness is probed where the run probes it, after
    the first chain's burn-in; stops at the first unstable chain. The weights are back at w* afterwards."""
    verdicts = []
    for i, chain in enumerate(chains):
        verdicts.append(Verdict(*_pilot_chain(engine, args, chain, probe=i == 0)))
        if not verdicts[-1].stable:
            break
    return Verdict.worst(verdicts) if verdicts else Verdict()


def _pilot_chain(
    engine: SamplingEngine, args: BIFArguments, chain: int, probe: bool, probe_only: bool = False
) -> Tuple[float, float, Optional[float]]:
    """(mean loss rise over w* in the second half: inf where a loss is not finite, NaN where not measurable; its
    limit; step_size x the sharpness after the burn-in, when `probe`) of one chain's pilot steps; with `probe_only`
    the steps end at the probe (no rise measured)."""
    eng = engine
    eng.weights.reset()
    sampler = chain_sampler(args, chain, eng.weights.masters, eng.weights.anchors, eng.context, eng.device)
    eng.stream.reset(stream_generator(args.seed, chain, args.antithetic_chains))
    size = eng.stream.batch_size
    steps = args.num_burnin_steps + PILOT_STEPS
    losses = torch.empty(steps, dtype=torch.float64, device=eng.device)
    at_anchor = torch.full_like(losses, math.nan)
    sharpness = None
    try:
        for k in range(steps):
            if k == args.num_burnin_steps:  # where the run freezes the preconditioner and probes the sharpness
                if args.freeze_preconditioner:
                    sampler.freeze()
                if probe:
                    root = sampler.apply_root  # at this rung's nbeta, as the run would probe it
                    found = probe_sharpness(eng.model, eng.views, eng.weights, eng.stream, args, root, 0.0)
                    sharpness = _scaled(found, args.step_size)
                    if probe_only or (sharpness is not None and sharpness > SHARPNESS_LIMIT):  # no more steps
                        return math.nan, RISE_RATIO * sampler.equilibrium_rise(), sharpness
            loss, grads = eng.gradient(eng.stream.next(), size)
            losses[k] = loss
            if eng.gradient.anchor_loss is not None:
                at_anchor[k] = eng.gradient.anchor_loss
            sampler.step(grads, size)
            eng.weights.sync()
    finally:
        eng.weights.reset()
    limit = RISE_RATIO * sampler.equilibrium_rise()
    if not bool(torch.isfinite(losses).all()):
        return math.inf, limit, sharpness
    rise = _rise(losses / size, at_anchor / size, full_batch=size >= eng.stream.n)
    return (math.nan if rise is None else rise), limit, sharpness  # None: finite losses are all it can check


def _larger(a: float, b: float) -> float:
    """max(a, b), with NaN (not measured) below every number."""
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _scaled(sharpness: Optional[float], step_size: float) -> Optional[float]:
    return None if sharpness is None or not math.isfinite(sharpness) else float(step_size) * sharpness


def _rise(losses: torch.Tensor, at_anchor: torch.Tensor, full_batch: bool) -> Optional[float]:
    """Mean per-example loss above w* over the second half of the steps: against the same minibatches at w* (the
    control variate computes those), or the first step's full-batch loss (taken at w*); None without either."""
    tail = slice(len(losses) // 2, None)
    if bool(torch.isfinite(at_anchor[tail]).all()):
        return float((losses[tail] - at_anchor[tail]).mean())
    if full_batch:
        return float(losses[tail].mean() - losses[0])
    return None
