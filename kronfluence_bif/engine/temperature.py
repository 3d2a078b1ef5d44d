"""The temperature pilot: the hottest stable (nbeta, localization) of a sampler's ladder, by short chains from w*.

At a fixed damping localization / nbeta, a hotter posterior (nbeta and localization lowered together) weighs the
BIF's second-order term more and predicts retraining better: on the demo UCI MLP, subspace-SGLD at nbeta 1e4 /
localization 1e2 scores LDS 0.347 / 0.218 (retrain fractions 0.5 / 0.1) against 0.307 / 0.159 at 1e5 / 1e3
(BENCHMARKS.md, "The defaults"). But the draws spread wider, and where the curvature grows quickly away from w*
the chain leaves the basin within a few steps: the digits MLP at 3e4 / 3e2 (step 10), UCI at 1e4 / 30 (step 9).
Which rung is stable is a property of the model (and of the chains' noise: digits at 3e4 / 3e2 diverges in some
chains and not in others), so it is measured: `choose_temperature` runs, per rung, hottest first, the first
burn-in + `PILOT_STEPS` steps of every chain, seeded exactly as the run seeds them, and keeps the first rung where
every chain's losses stay finite and their mean rise over w* in the second half stays within `RISE_RATIO` times
the rise a quadratic posterior settles at (`Sampler.equilibrium_rise`); if no rung passes, the sampler's defaults.
A run at the chosen rung repeats the pilot's steps exactly, so it cannot diverge within them. Each process pilots
its own chains and the verdicts are gathered, so every process (and a resumed run) takes the same rung. Its cost:
(burn-in + PILOT_STEPS) gradient steps per chain and rung tried, once per run (an unstable chain stops the rung).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.engine.seeds import chain_seed, stream_seed
from kronfluence_bif.logs import logger
from kronfluence_bif.samplers import make_sampler, sampler_class

if TYPE_CHECKING:
    from kronfluence_bif.engine.engine import SamplingEngine

PILOT_STEPS = 40  # steps after the burn-in; the rise is measured over the second half of all pilot steps
RISE_RATIO = 4.0  # a rise above this many equilibrium rises is a chain leaving the quadratic basin


def choose_temperature(engine: SamplingEngine) -> BIFArguments:
    """The engine's arguments with nbeta and localization set by the pilot (themselves when it does not apply)."""
    args = engine.args
    ladder = sampler_class(args.sampler).temperature_ladder
    if not args.calibrate_temperature or not ladder:
        return args
    chains = engine.state.plan(args.num_chains).chains  # this process's chains; the others pilot theirs
    for nbeta, localization in ladder:
        candidate = dataclasses.replace(args, nbeta=nbeta, localization=localization)
        verdict = pilot(engine, candidate, chains)
        verdicts = engine.state.all_gather_object(verdict)
        stable = all(v[0] for v in verdicts)
        logger.info(
            "Temperature pilot: nbeta %g, localization %g: %s (mean loss rise over w* %.3g, limit %.3g).",
            nbeta,
            localization,
            "stable" if stable else "unstable",
            max(v[1] for v in verdicts),
            verdict[2],
        )
        if stable:
            return candidate
    logger.info(
        "Temperature pilot: no hotter rung was stable; sampling at the sampler's defaults (nbeta %g, localization %g).",
        args.nbeta,
        args.localization,
    )
    return args


def pilot(engine: SamplingEngine, args: BIFArguments, chains: Sequence[int]) -> Tuple[bool, float, float]:
    """(stable, the largest mean loss rise over w* of the chains' second halves, its limit) of the first
    burn-in + PILOT_STEPS steps of `chains` with `args`, seeded as the run seeds them (so a run at a stable rung
    repeats these steps exactly); stops at the first unstable chain. The weights are back at w* afterwards."""
    largest, limit = -math.inf, math.inf
    for chain in chains:
        stable, rise, limit = _pilot_chain(engine, args, chain)
        largest = max(largest, rise)
        if not stable:
            return False, largest, limit
    return True, largest, limit


def _pilot_chain(engine: SamplingEngine, args: BIFArguments, chain: int) -> Tuple[bool, float, float]:
    eng = engine
    eng.weights.reset()
    generator = torch.Generator(device=eng.device).manual_seed(chain_seed(args.seed, chain))
    sampler = make_sampler(args, eng.weights.masters, eng.weights.anchors, generator, eng.context)
    eng.stream.reset(torch.Generator().manual_seed(stream_seed(args.seed, chain)))
    size = eng.stream.batch_size
    steps = args.num_burnin_steps + PILOT_STEPS
    losses = torch.empty(steps, dtype=torch.float64, device=eng.device)
    at_anchor = torch.full_like(losses, math.nan)
    try:
        for k in range(steps):
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
        return False, math.inf, limit
    rise = _rise(losses / size, at_anchor / size, full_batch=size >= eng.stream.n)
    if rise is None:  # nothing to compare with: finite losses are all the pilot can check
        return True, math.nan, limit
    return rise <= limit, rise, limit


def _rise(losses: torch.Tensor, at_anchor: torch.Tensor, full_batch: bool) -> Optional[float]:
    """Mean per-example loss above w* over the second half of the steps: against the same minibatches at w* (the
    control variate computes those), or the first step's full-batch loss (taken at w*); None without either."""
    tail = slice(len(losses) // 2, None)
    if bool(torch.isfinite(at_anchor[tail]).all()):
        return float((losses[tail] - at_anchor[tail]).mean())
    if full_batch:
        return float(losses[tail].mean() - losses[0])
    return None
