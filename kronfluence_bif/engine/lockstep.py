"""Chains in lockstep: this process's fresh chains advanced together, their weights a batch dimension.

The K chains' sampled weights live in stacked ``[K, ...]`` tensors (`kronfluence_bif.batched.ChainBatch`); chain
k's own sampler (built by the registry, unchanged) steps its views ``stacked[name][k]``, on its own minibatch
stream seeded as in `Chain`, so a chain in lockstep is the same chain as alone (same noise, same minibatches), to
float rounding. Per step, the K minibatch losses and their gradients come from one vmapped forward and backward;
per draw, every evaluation batch is one vmapped forward for all K chains. The model itself stays at w*.

Which chains run in lockstep (`lockstep_plan`, logged once per reason): `BIFArguments.batch_chains` True, or None
on a CUDA device; at least two chains in this process that start fresh (a chain resuming from a checkpoint runs
alone, as `Chain`); no evaluation group (num_shards == 1); cached data (the minibatches stack); fp32 sampled
weights; and a probe on perturbed weights where the vmapped values match the model's own. Everything else runs
one chain at a time (`Chain`), with the same `RunState`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils._pytree import tree_map

from kronfluence_bif.batched import ChainBatch, stack_batches
from kronfluence_bif.data import MinibatchStream
from kronfluence_bif.engine.chain import Chain, RunState
from kronfluence_bif.engine.gradients import with_control_variate
from kronfluence_bif.engine.seeds import chain_sampler, chain_seed, stream_generator
from kronfluence_bif.logs import logger
from kronfluence_bif.loss_views import PerExampleView
from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.samplers import Sampler

if TYPE_CHECKING:
    from kronfluence_bif.engine.engine import SamplingEngine

Result = Tuple[CrossMoments, Dict[str, Any]]
PROBE_TOLERANCE = 1e-4  # relative to the largest value: float32 rounding is ~1e-7, a weight change ~1e-2
_LOGGED: Set[str] = set()


def run_chains(
    engine: SamplingEngine, run: RunState, chains: Sequence[int], together: Sequence[int], reason: str
) -> List[Result]:
    """This process's chains, results in plan order: `together` (`lockstep_plan`) in lockstep, the others one at a
    time."""
    if reason or together:
        _log_once(reason or f"{len(together)} chains run in lockstep, batched over chains with torch.func.vmap.")
    results: Dict[int, Result] = {}
    for chain in chains:
        if chain not in together:
            results[chain] = Chain(engine, run, chain).run()
    if together:
        results.update(Lockstep(engine, run, together).run())
    return [results[c] for c in chains]


def lockstep_plan(engine: SamplingEngine, run: RunState, chains: Sequence[int]) -> Tuple[List[int], str]:
    """(the chains to run in lockstep, the reason the others run alone: '' when none do)."""
    setting, eng = engine.args.batch_chains, engine
    if setting is False or len(chains) < 2:
        return [], ""
    if setting is None and eng.device.type != "cuda":
        return [], ""  # None: lockstep pays on accelerators, not on CPU (BENCHMARKS.md)
    if run.plan.num_shards > 1:
        return [], "Chains run one at a time: this process shares each draw's evaluation with its group."
    if eng.stream.source.stacked is None:
        return [], "Chains run one at a time: the training data is not cached as stacked tensors (cache_batches)."
    if any(p.dtype != torch.float32 for p in eng.weights.params):
        return [], "Chains run one at a time: the sampled weights are not float32."
    fresh = [c for c in chains if eng.checkpoints is None or eng.checkpoints.load(c) is None]
    if len(fresh) < 2:
        return [], "Chains run one at a time: they resume from checkpoints."
    failure = probe(eng)
    if failure is not None:
        return (
            [],
            f"Chains run one at a time: the model cannot be batched over chains with torch.func.vmap ({failure}).",
        )
    skipped = [c for c in chains if c not in fresh]
    note = f"Chains {skipped} resume from checkpoints and run alone; chains {fresh} run in lockstep." if skipped else ""
    return fresh, note


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


# ---------------------------------------------------------------------------------------------- the probe
def _view_modes(views: Sequence[Any]) -> List[Tuple[PerExampleView, Optional[str]]]:
    """Every per-example view reachable from `views`, with its mode (vmap inside a chain vmap may flip it)."""
    found, stack = [], list(views)
    while stack:
        view = stack.pop()
        if isinstance(view, PerExampleView):
            found.append((view, view.mode))
        stack.extend(v for v in (getattr(view, a, None) for a in ("per_example", "sequence", "tokens")) if v)
    return found


def _differs(batched: torch.Tensor, direct: torch.Tensor) -> bool:
    scale = float(direct.abs().max()) if direct.numel() else 0.0
    return batched.shape != direct.shape or float((batched - direct).abs().max()) > PROBE_TOLERANCE * max(scale, 1e-12)


class _Mismatch(Exception):
    """The vmapped values of the probe differ from the model's own."""


def _probe_calls(engine: SamplingEngine) -> List[Tuple[Any, Any, Optional[int]]]:
    """(function, batch, batch dim) of the probe: the first batch of each evaluated side, a minibatch loss."""
    ev, stream = engine.evaluator, engine.stream
    calls: List[Tuple[Any, Any, Optional[int]]] = [(side.view, side.batches.first(), None) for side in ev.sides]
    if ev.monitor is not None:
        calls.append((ev.monitor.view, ev.monitor.batches.first(), None))
    minibatch = stream.source.gather(torch.arange(stream.batch_size))
    calls.append((engine.views.summed_train_loss, stack_batches([minibatch, minibatch]), 0))
    return calls


def _probe_values(engine: SamplingEngine, chains: ChainBatch, points: Sequence[List[torch.Tensor]]) -> None:
    """Raise `_Mismatch` unless each chain's vmapped values equal the model's own at its weights (to rounding)."""
    weights = engine.weights
    with torch.inference_mode(), engine.evaluator._autocast():
        for fn, batch, dim in _probe_calls(engine):
            values = chains.evaluate(fn, batch) if dim is None else chains.summed_losses(fn, batch)
            single = batch if dim is None else tree_map(lambda t: t[0] if torch.is_tensor(t) else t, batch)
            for k, point in enumerate(points):
                torch._foreach_copy_(weights.masters, point)
                weights.sync()
                if _differs(values[k], fn(single, engine.model)):
                    raise _Mismatch


def _probe_gradient(engine: SamplingEngine, chains: ChainBatch) -> None:
    """The vmapped minibatch losses differentiate w.r.t. the stacked weights (the step's backward)."""
    _, batch, _ = _probe_calls(engine)[-1]
    leaves = list(chains.stacked.values())
    with torch.enable_grad():
        for t in leaves:
            t.requires_grad_(True)
        try:
            losses = chains.summed_losses(engine.views.summed_train_loss, batch)
            torch.autograd.grad(losses.sum(), leaves)
        finally:
            for t in leaves:
                t.requires_grad_(False)


def probe(engine: SamplingEngine) -> Optional[str]:
    """None when two chains' vmapped values (at w* and at perturbed weights) match the model's own and their
    minibatch losses differentiate; else why not. The model is at w* after, the views' modes as before."""
    weights = engine.weights
    gen = torch.Generator(device=engine.device).manual_seed(chain_seed(engine.args.seed, 0) ^ 0x10C5)
    moved = [
        a + 1e-2 * (a.square().mean().sqrt() + 1e-3) * torch.randn(a.shape, generator=gen, device=a.device)
        for a in weights.anchors
    ]
    stacked = {n: torch.stack([a, m]) for n, a, m in zip(weights.names, weights.anchors, moved)}
    chains = ChainBatch(engine.model, weights.names, stacked, mode="vmap")
    ev = engine.evaluator
    modes = _view_modes([side.view for side in ev.sides] + ([ev.monitor.view] if ev.monitor is not None else []))
    try:
        _probe_values(engine, chains, [weights.anchors, moved])
        _probe_gradient(engine, chains)
        return None
    except _Mismatch:
        return "its vmapped values differ from the model's own"
    except Exception as exc:  # noqa: BLE001 - any failure means: one chain at a time
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        weights.reset()
        for view, mode in modes:
            view.mode = mode


# ---------------------------------------------------------------------------------------------- the chains
class Lane(Chain):
    """One chain of a lockstep run: its sampler on views of the stacked weights, its stream, its own buffers."""

    def __init__(self, engine: SamplingEngine, run: RunState, chain: int, params: List[torch.Tensor], buffer) -> None:
        own = dataclasses.replace(
            run, buffer=buffer, step_losses=torch.empty_like(run.step_losses), guard=copy.copy(run.guard)
        )
        super().__init__(engine, own, chain)
        self.params = params
        self.stream = MinibatchStream(engine.stream.source, engine.stream.batch_size)
        self.stream.reset(stream_generator(self.args.seed, chain, self.args.antithetic_chains))
        self.sampler = self._make_sampler()
        self._track_span(self.sampler)
        self.moments = self._new_moments()

    def _make_sampler(self) -> Sampler:
        eng = self.engine
        return chain_sampler(self.args, self.chain, self.params, eng.weights.anchors, eng.context, eng.device)

    def _masters_state(self) -> Dict[str, torch.Tensor]:
        return {f"master.{i}": p for i, p in enumerate(self.params)}

    def _stream_state(self) -> Dict[str, torch.Tensor]:
        return self.stream.state_dict()

    @torch.no_grad()
    def distance_from_anchor(self) -> torch.Tensor:
        """As `SampledWeights.distance_from_anchor`, for this chain's weights."""
        norms = torch._foreach_norm(torch._foreach_sub(self.params, self.engine.weights.anchors))
        return torch.stack(norms).square().sum().sqrt()


class Lockstep:
    """Runs `chains` of `engine` together within the run `run`; `run()` returns {chain: (moments, summary)}."""

    def __init__(self, engine: SamplingEngine, run: RunState, chains: Sequence[int]) -> None:
        self.engine = engine
        self.run_state = run
        self.args = engine.args
        weights = engine.weights
        weights.reset()
        self.stacked = {
            n: a.unsqueeze(0).repeat(len(chains), *[1] * a.dim()) for n, a in zip(weights.names, weights.anchors)
        }
        self.batch = ChainBatch(engine.model, weights.names, self.stacked, mode="auto")
        # the control variate's gradients at w*: the same vmapped pass over K copies of w* (`StepGradient`)
        self.at_anchor: Optional[Tuple[ChainBatch, Dict[str, torch.Tensor]]] = None
        if engine.gradient.control_variate:
            anchors = {n: t.clone() for n, t in self.stacked.items()}
            self.at_anchor = (ChainBatch(engine.model, weights.names, anchors, mode="auto"), anchors)
        self.buffers = torch.empty(len(chains), *run.buffer.shape, dtype=run.buffer.dtype, device=run.buffer.device)
        self.lanes = [
            Lane(engine, run, chain, [t[k] for t in self.stacked.values()], self.buffers[k])
            for k, chain in enumerate(chains)
        ]
        run.span = run.span or self.lanes[0].run_state.span  # set on the lanes' copies of the run's state

    def run(self) -> Dict[int, Result]:
        args, lanes = self.args, self.lanes
        for step in range(args.num_burnin_steps):
            self._step(step)
        self._after_burn_in()
        step = args.num_burnin_steps
        for lane in lanes:
            lane.run_state.guard.checked_steps = 0
            lane.run_state.guard.check_steps(lane.run_state.step_losses[:step], lane.chain)
        step = self._draws(step)
        results: Dict[int, Result] = {}
        for lane in lanes:
            summary = lane._summary()
            if self.engine.checkpoints is not None:
                lane._save(lane.moments, args.num_draws, step, None, summary)
            lane._log_summary(summary)
            results[lane.chain] = (lane.moments, summary)
        self.engine.weights.reset()
        return results

    def _after_burn_in(self) -> None:
        """Preconditioners frozen; the sharpness measured (as `Chain`: on the first chain, at its weights)."""
        eng, run, first = self.engine, self.run_state, self.lanes[0]
        if self.args.freeze_preconditioner:
            for lane in self.lanes:
                lane.sampler.freeze()
        if run.sharpness is None:
            torch._foreach_copy_(eng.weights.masters, first.params)
            eng.weights.sync()
            try:
                run.sharpness = eng.context.sharpness(first.sampler.apply_root, 0.0)
            finally:
                eng.weights.reset()

    def _step(self, index: int) -> None:
        """One step of every chain, each on its own next minibatch: one vmapped forward and backward for all."""
        batches = stack_batches([lane.stream.next() for lane in self.lanes])
        losses, grads = self._gradients(self.batch, self.stacked, batches)
        size = self.engine.stream.batch_size
        if self.at_anchor is not None:  # as `StepGradient`
            _, at_anchor = self._gradients(*self.at_anchor, batches)
            grads = with_control_variate(grads, at_anchor, self.engine.context.anchor_gradient(), size)
        for k, lane in enumerate(self.lanes):
            lane.sampler.step([g[k] for g in grads], size)
            lane.run_state.step_losses[index] = losses[k].detach()

    def _gradients(
        self, batch: ChainBatch, stacked: Dict[str, torch.Tensor], batches: Any
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """[K] minibatch losses and the stacked [K, ...] gradients of the weights in `stacked`: one vmapped forward
        and backward."""
        leaves = list(stacked.values())
        with torch.enable_grad():
            for t in leaves:
                t.requires_grad_(True)
            try:
                losses = batch.summed_losses(self.engine.views.summed_train_loss, batches)
                grads = torch.autograd.grad(losses.sum(), leaves)
            finally:
                for t in leaves:
                    t.requires_grad_(False)
        return losses, list(grads)

    def _draws(self, step: int) -> int:
        """Every chain's draws, blocks flushed and checkpointed together; returns the step count."""
        args, run = self.args, self.run_state
        filled, first = 0, 0
        for draw in range(args.num_draws):
            step = self._draw(step, filled, draw)
            filled += 1
            if filled == args.draws_per_block or draw == args.num_draws - 1:
                for lane in self.lanes:
                    lane._flush(lane.moments, filled, first)
                    lane.run_state.guard.check_steps(lane.run_state.step_losses[:step], lane.chain)
                    run.bar.update(filled * run.bar_scale)
                before, first, filled = first, first + filled, 0
                if first < args.num_draws and self.lanes[0]._checkpoint_due(before, first):
                    for lane in self.lanes:
                        lane._save(lane.moments, first, step, lane.sampler, None)
        return step

    def _draw(self, step: int, row: int, draw: int) -> int:
        """Steps up to the next kept draw, then every chain's evaluation into its buffer row `row`."""
        interval, traced = self.args.draw_interval, self.lanes[0].traced_flags[draw]
        for k in range(interval):
            for lane in self.lanes:
                lane.sampler.track_norms = traced and k == interval - 1
            self._step(step)
            step += 1
        self._evaluate(self.buffers[:, row])
        for lane in self.lanes:
            lane._record_coordinates(lane.sampler, row)
        if traced:  # as `Chain._draw`: distance, then the move norms, one write per chain
            for lane in self.lanes:
                distance = lane.distance_from_anchor()
                values = torch.cat([distance.view(1), lane.sampler.last_norms.to(distance)])
                self.run_state.step_traces[:, lane.chain, draw] = values
        return step

    def _evaluate(self, rows: torch.Tensor) -> None:
        """As `Evaluator.evaluate` (every batch: this process is no group member), for all chains: rows [K, width]."""
        ev, k = self.engine.evaluator, rows.shape[0]
        sides = [side for side in ev.sides] + ([ev.monitor] if ev.monitor is not None else [])
        offset = 0
        with torch.inference_mode(), ev._autocast():
            for side in sides:
                for batch in side.batches:
                    values = self.batch.evaluate(side.view, batch).reshape(k, -1)
                    rows[:, offset : offset + values.shape[1]] = values
                    offset += values.shape[1]
