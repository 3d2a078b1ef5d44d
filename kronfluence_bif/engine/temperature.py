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
(`_fitted_step`). The pilot chains are the run's own (`PilotChain`: the same steps, and the draws evaluated), so
at the chosen rung each chain continues from the pilot's last draw (`chain.ChainPrefix`) instead of repeating its
steps, with bitwise the moments it would have had: the pilot costs only the rungs it rejects. Each process pilots
its own chains and the verdicts are gathered, so every process (and a resumed run) takes the same rung. Its cost:
up to burn-in + PILOT_STEPS gradient steps per chain and rejected rung, once per run (an unstable chain stops the
rung, a non-finite loss within CHECK_EVERY steps); the chosen rung's steps are the run's. Chains in lockstep, and
prefixes beyond `PREFIX_BUDGET` bytes, start over from w*: the same chain again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.diagnostics import SHARPNESS_LIMIT
from kronfluence_bif.engine.chain import Chain, ChainPrefix, RunState
from kronfluence_bif.engine.guards import probe_sharpness
from kronfluence_bif.engine.seeds import stream_generator
from kronfluence_bif.logs import logger
from kronfluence_bif.samplers import Sampler, sampler_class

if TYPE_CHECKING:
    from kronfluence_bif.engine.engine import SamplingEngine

PILOT_STEPS = 40  # steps after the burn-in; the rise is measured over the second half of all pilot steps
RISE_RATIO = 4.0  # a rise above this many equilibrium rises is a chain leaving the quadratic basin
STEP_MARGIN = 0.9  # a too-sharp fallback's step: this fraction of the largest step its sharpness allows
PREFIX_BUDGET = 1 << 30  # bytes of chain prefixes a process keeps (weights, sampler state, evaluated rows)
CHECK_EVERY = 10  # a pilot chain's losses are checked for non-finite values every this many steps (one host sync)


class _NotFinite(Exception):
    """A pilot chain's loss is not finite: the rung is unstable, no need to run the chain's other steps."""


@dataclass
class Rung:
    """The pilot's choice: the arguments to sample with, the chains' prefixes at them (this process's chains that
    run alone), and the raw sharpness after the first chain's burn-in (None: not measured at this rung)."""

    args: BIFArguments
    prefixes: Dict[int, ChainPrefix] = field(default_factory=dict)
    sharpness: Optional[float] = None


def choose_temperature(engine: SamplingEngine, run: RunState, alone: Sequence[int]) -> Rung:
    """The rung to sample at (the engine's arguments when the pilot does not apply), with the prefixes of the
    chains in `alone` (those that will run one at a time) at that rung."""
    args = engine.args
    ladder = sampler_class(args.sampler).temperature_ladder
    if not args.calibrate_temperature or not ladder:
        return Rung(args)
    chains = run.plan.chains  # this process's chains; the others pilot theirs
    for nbeta, localization in ladder:
        candidate = dataclasses.replace(args, nbeta=nbeta, localization=localization)
        outcome = _safe_pilot(engine, run, candidate, chains, alone)
        verdict = Verdict.worst(engine.state.all_gather_object(outcome.verdict))
        logger.info("Temperature pilot: nbeta %g, localization %g: %s.", nbeta, localization, verdict.describe())
        if verdict.stable:
            return Rung(candidate, outcome.prefixes, outcome.sharpness)
    logger.info(
        "Temperature pilot: no rung of the ladder was stable; sampling at the sampler's defaults (nbeta %g, "
        "localization %g).",
        args.nbeta,
        args.localization,
    )
    return Rung(_fitted_step(engine, run, args, chains[0]))


def _fitted_step(engine: SamplingEngine, run: RunState, args: BIFArguments, chain: int) -> BIFArguments:
    """The fallback, with its step lowered to STEP_MARGIN of what its sharpness allows where step x sharpness after
    the first chain's burn-in would exceed the diagnostics' limit: the `sharpness` warning's own fix, so the
    defaults do not warn (digits seed 1: 2.54 at step 1.0; at 0.7 no warning and LDS 0.361 against 0.362)."""
    probes = engine.state.all_gather_object(_safe_probe(engine, run, args, chain))
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


def _safe_probe(engine: SamplingEngine, run: RunState, args: BIFArguments, chain: int) -> Optional[float]:
    """step x sharpness after `chain`'s burn-in at `args` (None where it cannot be measured, or on an error: every
    process must reach the gather)."""
    try:
        return PilotChain(engine, run, chain, args, probe=True, probe_only=True).pilot().verdict.sharpness
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


@dataclass
class Outcome:
    """One process's pilot of one rung: the verdict, its stable chains' prefixes, the first chain's raw sharpness."""

    verdict: Verdict
    prefixes: Dict[int, ChainPrefix] = field(default_factory=dict)
    sharpness: Optional[float] = None


def _safe_pilot(
    engine: SamplingEngine, run: RunState, args: BIFArguments, chains: Sequence[int], alone: Sequence[int]
) -> Outcome:
    """`pilot`, with an error failing the rung instead of escaping: every process must reach the gather (or the
    others would wait for it), and the run itself meets the same error where it reports it properly."""
    try:
        return pilot(engine, run, args, chains, alone)
    except Exception as exc:  # noqa: BLE001 - reported by the run at the rung it falls back to
        logger.info("Temperature pilot: nbeta %g failed (%s: %s).", args.nbeta, type(exc).__name__, exc)
        return Outcome(Verdict(rise=math.inf))


def pilot(
    engine: SamplingEngine, run: RunState, args: BIFArguments, chains: Sequence[int], alone: Sequence[int] = ()
) -> Outcome:
    """The verdict of the first burn-in + PILOT_STEPS steps of `chains` with `args`, run as the run runs them, and
    the prefixes of those in `alone` while they fit in PREFIX_BUDGET; the sharpness is probed where the run probes
    it, after the first chain's burn-in; stops at the first unstable chain. The weights are back at w* afterwards."""
    outcome, verdicts, kept = Outcome(Verdict()), [], 0
    for i, chain in enumerate(chains):
        piloted = PilotChain(engine, run, chain, args, probe=i == 0, keep=chain in alone).pilot()
        verdicts.append(piloted.verdict)
        if i == 0:
            outcome.sharpness = piloted.sharpness
        if not piloted.verdict.stable:
            outcome.prefixes.clear()
            break
        prefix = piloted.prefixes.get(chain)
        if prefix is not None and kept + prefix.nbytes() <= PREFIX_BUDGET:
            outcome.prefixes[chain] = prefix
            kept += prefix.nbytes()
    outcome.verdict = Verdict.worst(verdicts) if verdicts else Verdict()
    return outcome


class PilotChain(Chain):
    """A chain's first burn-in + PILOT_STEPS steps (rounded up to whole draws), run exactly as `Chain` runs them
    (its draws evaluated into its own buffer rows, nothing accumulated): the rise of its losses over w*, the
    sharpness after its burn-in where `probe`, and its `ChainPrefix` where `keep`."""

    def __init__(
        self,
        engine: SamplingEngine,
        run: RunState,
        chain: int,
        args: BIFArguments,
        probe: bool,
        keep: bool = False,
        probe_only: bool = False,
    ) -> None:
        self.draws = min(args.num_draws, math.ceil(PILOT_STEPS / args.draw_interval))
        own = dataclasses.replace(
            run,
            buffer=run.buffer.new_empty(self.draws, run.buffer.shape[1]),
            step_losses=torch.empty_like(run.step_losses),
            step_traces=torch.zeros_like(run.step_traces),
            sharpness=None,
            span=None,
            prefixes={},
        )
        super().__init__(engine, own, chain, args)
        self.probe, self.keep, self.probe_only = probe, keep, probe_only
        self.anchor_losses = torch.full_like(own.step_losses, math.nan, dtype=torch.float64)

    def pilot(self) -> Outcome:
        eng, args = self.engine, self.args
        steps = args.num_burnin_steps + self.draws * args.draw_interval
        eng.weights.reset()
        sampler = self._make_sampler()
        self._track_span(sampler)
        if self.coordinates is not None:
            self.coordinates = self.coordinates.new_empty(self.draws, self.coordinates.shape[1])
        eng.stream.reset(stream_generator(args.seed, self.chain, args.antithetic_chains))
        limit = RISE_RATIO * sampler.equilibrium_rise()
        sharpness = raw = None
        try:
            for step in range(args.num_burnin_steps):
                self._step(sampler, step)
            if args.freeze_preconditioner:
                sampler.freeze()
            raw = self._probe(sampler) if self.probe else None
            sharpness = _scaled(raw, args.step_size)
            if self.probe_only or (sharpness is not None and sharpness > SHARPNESS_LIMIT):  # no more steps
                return Outcome(Verdict(math.nan, limit, sharpness), sharpness=raw)
            step = args.num_burnin_steps
            for draw in range(self.draws):
                step = self._draw(sampler, step, draw, draw)
            prefixes = {self.chain: self._prefix(sampler, steps)} if self.keep else {}
        except _NotFinite:
            return Outcome(Verdict(math.inf, limit, sharpness), sharpness=raw)
        finally:
            eng.weights.reset()
        return Outcome(Verdict(self._rise(steps), limit, sharpness), prefixes, raw)

    def _probe(self, sampler: Sampler) -> Optional[float]:
        """The raw sharpness at this rung's nbeta, as the run's first chain measures it after its burn-in."""
        eng = self.engine
        return probe_sharpness(eng.model, eng.views, eng.weights, eng.stream, self.args, sampler.apply_root, 0.0)

    def _step(self, sampler: Sampler, index: int) -> None:
        """The chain's step, its loss at w* kept (control variate), and every CHECK_EVERY steps its losses checked:
        a chain whose loss is no longer finite stops there (a diverging rung costs about 10 steps, not 60)."""
        super()._step(sampler, index)
        if self.engine.gradient.anchor_loss is not None:
            self.anchor_losses[index] = self.engine.gradient.anchor_loss
        if (index + 1) % CHECK_EVERY == 0:
            recent = self.run_state.step_losses[index + 1 - CHECK_EVERY : index + 1]
            if not bool(torch.isfinite(recent).all()):
                raise _NotFinite

    def _rise(self, steps: int) -> float:
        """The mean loss rise over w* in the second half (inf where a loss is not finite, NaN: not measurable)."""
        size = self.engine.stream.batch_size
        losses = self.run_state.step_losses[:steps].double()
        if not bool(torch.isfinite(losses).all()):
            return math.inf
        rise = _rise(losses / size, self.anchor_losses[:steps] / size, full_batch=size >= self.engine.stream.n)
        return math.nan if rise is None else rise  # None: finite losses are all it can check

    def _prefix(self, sampler: Sampler, steps: int) -> ChainPrefix:
        """The chain after its pilot draws, as the run continues it (every tensor a copy)."""
        eng, run = self.engine, self.run_state

        def copies(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}

        return ChainPrefix(
            draws=self.draws,
            steps=steps,
            rows=run.buffer.clone(),
            coordinates=None if self.coordinates is None else self.coordinates.clone(),
            step_losses=run.step_losses[:steps].clone(),
            step_traces=run.step_traces[:, self.chain, : self.draws].clone(),
            weights=copies(eng.weights.masters_state()),
            sampler=copies(sampler.state_dict()),
            stream=copies(eng.stream.state_dict()),
            next_gradient=None if self._next is None else (self._next[0].clone(), [g.clone() for g in self._next[1]]),
        )


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
