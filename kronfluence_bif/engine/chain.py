"""One chain: burn-in, draws in blocks, resume from a checkpoint, checkpoint saves.

The chain loop asks the sampler for steps (`Sampler.step`, on a minibatch gradient) and the evaluator to fill a
buffer row at each kept draw; every `draws_per_block` draws the block is exchanged within the evaluation group,
checked for divergence (one host sync per block) and added to the chain's float64 moments with one GEMM. With an
evaluation group, a member that fails keeps pace with its partners until the next exchange, where every member
learns of it (otherwise the partners would wait forever in the exchange).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

from kronfluence_bif.distributed import WorkPlan
from kronfluence_bif.engine.evaluation import _Layout
from kronfluence_bif.engine.guards import DivergenceGuard
from kronfluence_bif.engine.seeds import chain_sampler, stream_generator
from kronfluence_bif.logs import logger
from kronfluence_bif.moments import COORDINATES, CrossMoments
from kronfluence_bif.samplers import LinearSpan, Sampler

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from kronfluence_bif.arguments import BIFArguments
    from kronfluence_bif.engine.engine import SamplingEngine

TRACE_NAMES = (
    "mean_train_loss",
    "mean_measurement",
    "distance_from_w_star",
    "gradient_step_norm",  # |eps/2 G nbeta/m sum grad|: the move towards lower loss in the step before a draw
    "localization_step_norm",  # |eps/2 G gamma (w - w*)|: the pull back towards w*
    "noise_step_norm",  # |sqrt(eps G) xi|: the injected noise
)
NORM_TRACES = TRACE_NAMES[3:]
STEP_TRACES = TRACE_NAMES[2:]  # written together at a traced draw: rows of `RunState.step_traces`
# the step traces are taken at every STEP_TRACE_INTERVAL-th draw (and the last): they cost about 16% of a UCI run
# when taken at every draw (benchmarks/diagnostics_cost.py), ~2% like this; the other draws hold NaN
STEP_TRACE_INTERVAL = 8
COORDINATE_KEY = f"moments.{COORDINATES}.sum_x"  # in a checkpoint whose moments kept the span coordinates
NEXT_LOSS_KEY = "next.loss"  # in a checkpoint taken after a draw whose forwards gave the next step's gradient
Gradient = Tuple[torch.Tensor, List[torch.Tensor]]  # (summed loss, gradient per sampled tensor)


def traced_draws(args: BIFArguments) -> torch.Tensor:
    """[num_draws] bool: the draws whose step traces are taken (none without `step_diagnostics`)."""
    draws = torch.arange(args.num_draws)
    mask = (draws % STEP_TRACE_INTERVAL == 0) | (draws == args.num_draws - 1)
    return mask & bool(args.step_diagnostics)


@dataclass
class RunState:
    """What one `SamplingEngine.run()` shares between its chains; created in one place (`SamplingEngine._start`)."""

    plan: WorkPlan
    layout: _Layout
    shift: torch.Tensor  # float64 [n_x + n_y + n_m]: the values at w*, subtracted before accumulation
    buffer: torch.Tensor  # float32 [draws_per_block, n_x + n_y + n_m]: one block of evaluated draws
    step_losses: torch.Tensor  # float32 [burn-in + draws x interval]: each step's minibatch loss
    traces: Dict[str, torch.Tensor]  # float64 [num_chains, num_draws] per TRACE_NAMES
    step_traces: torch.Tensor  # float64 [4, num_chains, num_draws]: the STEP_TRACES, whose `traces` are its rows
    guard: DivergenceGuard
    bar: tqdm
    bar_scale: Union[int, float]  # bar units per draw of this process: its group's share of all chains
    sharpness: Optional[float] = None  # after the first chain's burn-in (diagnostics)
    span: Optional[LinearSpan] = None  # the chains' span, where the linear control variate applies (first chain)
    prefixes: Dict[int, ChainPrefix] = field(default_factory=dict)  # chains' first draws, run by the pilot
    # a full-batch step's gradient comes from the draw's forwards of every training example (`fuses_gradient`)
    fused_gradient: bool = False


@dataclass
class ChainPrefix:
    """A chain's first `draws` draws as the temperature pilot ran them at the rung the run takes (the same steps,
    noise and minibatches): the chain's state after them and their evaluated rows. The run continues the chain from
    here instead of repeating its steps, and flushes the rows in the blocks an uninterrupted chain would (so its
    moments are bitwise the same)."""

    draws: int
    steps: int
    rows: torch.Tensor  # float32 [draws, width]: the evaluated buffer rows
    coordinates: Optional[torch.Tensor]  # float64 [draws, k]: their span coordinates (linear control variate)
    step_losses: torch.Tensor  # float32 [steps]
    step_traces: torch.Tensor  # float64 [len(STEP_TRACES), draws]
    weights: Dict[str, torch.Tensor]  # `SampledWeights.masters_state()`, cloned
    sampler: Dict[str, torch.Tensor]
    stream: Dict[str, torch.Tensor]
    next_gradient: Optional[Gradient] = None  # the next step's (loss, gradient), from the last draw's forwards

    def nbytes(self) -> int:
        tensors = [self.rows, self.coordinates, self.step_losses, self.step_traces]
        tensors += [*self.weights.values(), *self.sampler.values(), *self.stream.values()]
        tensors += [] if self.next_gradient is None else [self.next_gradient[0], *self.next_gradient[1]]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class Chain:
    """Runs chain `chain` of `engine` within the run `run`; `run()` returns its moments and summary."""

    def __init__(self, engine: SamplingEngine, run: RunState, chain: int, args: Optional[BIFArguments] = None) -> None:
        """`args`: the chain's arguments where they are not the engine's (the temperature pilot's rungs)."""
        self.engine = engine
        self.run_state = run
        self.chain = chain
        self.args = engine.args if args is None else args
        self.traced = traced_draws(self.args)
        self.traced_flags: List[bool] = self.traced.tolist()  # read once per draw: no tensor indexing there
        self.failure: Optional[BaseException] = None
        # [draws_per_block, k]: the block's span coordinates, for the linear control variate (`_track_span`)
        self.coordinates: Optional[torch.Tensor] = None
        self._next: Optional[Gradient] = None  # the next step's (loss, gradient), from the last draw's forwards

    def run(self) -> Tuple[CrossMoments, Dict[str, Any]]:
        eng, args, run = self.engine, self.args, self.run_state
        eng.weights.reset()
        sampler = self._make_sampler()
        self._track_span(sampler)
        eng.stream.reset(stream_generator(args.seed, self.chain, args.antithetic_chains))
        resumed = self._load()
        prefix = run.prefixes.pop(self.chain, None)  # a checkpoint, from an earlier run, goes first
        filled = 0
        if resumed is not None:
            moments, start, step, summary = self._restore(resumed, sampler)
            if summary is not None:
                return moments, summary
        elif prefix is not None:
            moments = self._new_moments()
            start, step, filled = self._continue(prefix, sampler, moments)
        else:
            moments, start, step = self._new_moments(), 0, 0
            self._burn_in(sampler)
            step = args.num_burnin_steps
        run.guard.checked_steps = 0 if resumed is None else step
        run.guard.check_steps(run.step_losses[:step], self.chain)
        step = self._draws(sampler, moments, start, step, filled)
        summary = self._summary()
        if eng.checkpoints is not None:
            try:
                self._save(moments, args.num_draws, step, None, summary)
            except Exception as exc:  # noqa: BLE001 - re-raised just below, on every member
                self.failure = self._defer(exc)
        self._agree()
        self._log_summary(summary)
        return moments, summary

    def _log_summary(self, summary: Dict[str, Any]) -> None:
        if self.run_state.plan.is_group_leader:
            logger.info(
                "Chain %d: mean train loss %.4g at w*, %.4g over draws; distance from w* %.3g at the end, "
                "%.3g at most.",
                self.chain,
                summary["initial_mean_loss"],
                summary["mean_loss"],
                summary["final_distance_from_w_star"],
                summary["max_distance_from_w_star"],
            )

    def _make_sampler(self) -> Sampler:
        eng = self.engine
        return chain_sampler(self.args, self.chain, eng.weights.masters, eng.weights.anchors, eng.context, eng.device)

    def _track_span(self, sampler: Sampler) -> None:
        """Keep the draws' span coordinates when the linear control variate applies (the run's span: the first)."""
        span = sampler.linear_span() if self.args.linear_control_variate else None
        if span is None:
            return
        if self.run_state.span is None:
            self.run_state.span = span
        self.coordinates = torch.empty(
            self.args.draws_per_block, span.rank, dtype=torch.float64, device=self.engine.device
        )

    def _new_moments(self) -> CrossMoments:
        lay, diagonal = self.run_state.layout, self.engine.diagonal
        own_x = lay.dim_x if lay.own is None else lay.own.numel()
        own_y = own_x if diagonal else lay.dim_y
        rank = 0 if self.coordinates is None else self.coordinates.shape[1]
        return CrossMoments(own_x, own_y, diagonal=diagonal, device=self.engine.device, coordinates=rank)

    def _burn_in(self, sampler: Sampler) -> None:
        """The discarded steps, then the preconditioner frozen and (first chain) the sharpness measured."""
        for step in range(self.args.num_burnin_steps):
            self._step(sampler, step)
        if self.args.freeze_preconditioner:
            sampler.freeze()
        if self.run_state.sharpness is None:
            # the localization's own limit is checked by BIFArguments
            self.run_state.sharpness = self.engine.context.sharpness(sampler.apply_root, 0.0)

    def _step(self, sampler: Sampler, index: int) -> None:
        """One sampler step on the next minibatch; its loss goes to the step losses (checked once per block)."""
        eng = self.engine
        size = eng.stream.batch_size
        loss, grads = eng.gradient(eng.stream.next(), size, self._next)
        self._next = None
        sampler.step(grads, size)
        eng.weights.sync()
        self.run_state.step_losses[index] = loss

    def _continue(self, prefix: ChainPrefix, sampler: Sampler, moments: CrossMoments) -> Tuple[int, int, int]:
        """The chain's state after the pilot's `prefix`; its complete blocks flushed into `moments`, the rest left in
        the buffer: (next draw, step count, rows filled)."""
        eng, run, block = self.engine, self.run_state, self.args.draws_per_block
        eng.weights.load_masters_state(prefix.weights)
        sampler.load_state_dict(prefix.sampler)
        eng.stream.load_state_dict(prefix.stream)
        self._next = prefix.next_gradient
        run.guard.checked_steps = 0  # this chain's steps, not the previous chain's
        run.step_losses[: prefix.steps] = prefix.step_losses
        run.step_traces[:, self.chain, : prefix.draws] = prefix.step_traces
        for first in range(0, prefix.draws, block):
            rows = min(block, prefix.draws - first)
            self._refill(prefix, first, rows)
            if rows < block and prefix.draws < self.args.num_draws:  # a partial block: the chain's draws fill it
                return prefix.draws, prefix.steps, rows
            steps = self.args.num_burnin_steps + (first + rows) * self.args.draw_interval
            self._end_block(moments, rows, first, steps, None)  # no checkpoint: the sampler is at the prefix's end
        return prefix.draws, prefix.steps, 0

    def _refill(self, prefix: ChainPrefix, first: int, rows: int) -> None:
        self.run_state.buffer[:rows] = prefix.rows[first : first + rows]
        if self.coordinates is not None and prefix.coordinates is not None:
            self.coordinates[:rows] = prefix.coordinates[first : first + rows]

    # ------------------------------------------------------------------ draws
    def _draws(self, sampler: Sampler, moments: CrossMoments, start: int, step: int, filled: int = 0) -> int:
        """Draws `start` .. num_draws in blocks (checkpointed at block boundaries), the block's first `filled` rows
        already in the buffer; returns the step count."""
        args = self.args
        first = start - filled
        for draw in range(start, args.num_draws):
            if self.failure is None:
                try:
                    step = self._draw(sampler, step, filled, draw)
                except Exception as exc:  # noqa: BLE001 - re-raised at the group's next exchange
                    self.failure = self._defer(exc)
            filled += 1
            if filled == args.draws_per_block or draw == args.num_draws - 1:
                first, filled = self._end_block(moments, filled, first, step, sampler), 0
        return step

    def _end_block(self, moments: CrossMoments, filled: int, first: int, step: int, sampler: Optional[Sampler]) -> int:
        """A full buffer: agree, flush, check the steps, advance the bar, and checkpoint when one is due (with a
        `sampler` to save); returns the next block's first draw."""
        run = self.run_state
        self._agree()
        self._flush(moments, filled, first)
        run.guard.check_steps(run.step_losses[:step], self.chain)
        run.bar.update(filled * run.bar_scale)
        after = first + filled
        if sampler is not None and after < self.args.num_draws and self._checkpoint_due(first, after):
            try:
                self._save(moments, after, step, sampler, None)
            except Exception as exc:  # noqa: BLE001 - re-raised at the group's next exchange
                self.failure = self._defer(exc)
        return after

    def _draw(self, sampler: Sampler, step: int, row: int, draw: int) -> int:
        """Sampler steps up to the next kept draw, then its evaluation into buffer row `row`; returns the step count."""
        eng, run, interval = self.engine, self.run_state, self.args.draw_interval
        traced = self.traced_flags[draw]
        for k in range(interval):
            sampler.track_norms = traced and k == interval - 1
            self._step(sampler, step)
            step += 1
        fuse = run.fused_gradient and draw < self.args.num_draws - 1  # a step follows
        self._next = eng.evaluator.evaluate(run.buffer[row], run.layout.mine, eng.weights.params if fuse else None)
        self._record_coordinates(sampler, row)
        if traced:  # one write for the four step traces (rows of one tensor): distance, then the move norms
            distance = eng.weights.distance_from_anchor()
            run.step_traces[:, self.chain, draw] = torch.cat([distance.view(1), sampler.last_norms.to(distance)])
        return step

    def _record_coordinates(self, sampler: Sampler, row: int) -> None:
        if self.coordinates is not None:
            self.coordinates[row].copy_(sampler.span_coordinates())

    def _flush(self, moments: CrossMoments, filled: int, first: int) -> None:
        """Exchange the group's shards, check, shift by the values at w*, reduce, and add the block."""
        eng, run = self.engine, self.run_state
        lay, evaluator = run.layout, eng.evaluator
        block = run.buffer[:filled]
        eng.state.all_gather_columns(block, lay.gather_columns, run.plan.group_ranks)
        mean_loss = evaluator.monitor_mean(block, lay)
        run.guard.check_block(mean_loss, block, self.chain, first)
        run.traces["mean_train_loss"][self.chain, first : first + filled] = mean_loss
        run.traces["mean_measurement"][self.chain, first : first + filled] = evaluator.mean_measurement(block, lay)
        coordinates = None if self.coordinates is None else self.coordinates[:filled]
        moments.update(*evaluator.centered(block, run.shift, lay, eng.diagonal), coordinates)

    # ------------------------------------------------------------------ group failures
    def _defer(self, exc: BaseException) -> BaseException:
        """Alone, fail now; in an evaluation group, hold the error until the group's next exchange."""
        if self.run_state.plan.num_shards == 1:
            raise exc
        return exc

    def _agree(self) -> None:
        """In an evaluation group: every member raises when any member failed (one small exchange per block)."""
        plan, failure = self.run_state.plan, self.failure
        if plan.num_shards == 1:
            return
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = self.engine.state.group_all_gather_object(report, plan.group_ranks)
        if failure is not None:
            raise failure
        for rank, message in zip(plan.group_ranks, reports):
            if message is not None:
                raise RuntimeError(f"Process {rank} of this evaluation group failed on chain {self.chain}: {message}")

    # ------------------------------------------------------------------ checkpoints and summary
    def _load(self) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """This chain's checkpoint, if any (in a group: only when every member has the same one)."""
        eng, plan = self.engine, self.run_state.plan
        resumed = eng.checkpoints.load(self.chain) if eng.checkpoints is not None else None
        if resumed is not None and (COORDINATE_KEY in resumed[0]) != (self.coordinates is not None):
            # the span's exactness depends on the environment (double backward), not only on the arguments
            logger.warning("Chain %d: its checkpoint disagrees on the span coordinates; it starts over.", self.chain)
            resumed = None
        if plan.num_shards > 1 and eng.checkpoints is not None:
            # the members of a group exchange values every block, so they resume from the same draw or not at all
            where = None if resumed is None else (resumed[1]["draws_done"], resumed[1]["done"])
            if len(set(eng.state.group_all_gather_object(where, plan.group_ranks))) != 1:
                logger.warning("Chain %d: the group's checkpoints disagree; the chain starts over.", self.chain)
                resumed = None
        return resumed

    def _restore(self, resumed, sampler: Sampler) -> Tuple[CrossMoments, int, int, Optional[Dict[str, Any]]]:
        """Moments, traces, weights, sampler and stream from a checkpoint: (moments, draw, step, summary if done)."""
        eng, run = self.engine, self.run_state
        tensors, meta = resumed
        moments = CrossMoments.from_state_dict(_prefixed(tensors, "moments."), eng.device)
        start, step = int(meta["draws_done"]), int(meta["steps_done"])
        for name in TRACE_NAMES:
            run.traces[name][self.chain, :start] = tensors[f"trace.{name}"].to(eng.device)
        run.bar.update(start * run.bar_scale)
        if meta["done"]:
            logger.info("Chain %d: complete in its checkpoint; not sampled again.", self.chain)
            return moments, start, step, meta["summary"]
        eng.weights.load_masters_state(tensors)
        sampler.load_state_dict(_prefixed(tensors, "sampler."))
        eng.stream.load_state_dict(_prefixed(tensors, "stream."))
        if NEXT_LOSS_KEY in tensors:
            grads = _prefixed(tensors, "next.grad.")
            self._next = (
                tensors[NEXT_LOSS_KEY].to(eng.device),
                [grads[str(i)].to(eng.device) for i in range(len(grads))],
            )
        logger.info("Chain %d: resuming from its checkpoint at draw %d of %d.", self.chain, start, self.args.num_draws)
        return moments, start, step, None

    def _checkpoint_due(self, before: int, after: int) -> bool:
        every = self.args.checkpoint_interval
        return self.engine.checkpoints is not None and every > 0 and after // every > before // every

    def _save(self, moments, draws_done: int, steps_done: int, sampler: Optional[Sampler], summary) -> None:
        eng, traces = self.engine, self.run_state.traces
        tensors = {f"moments.{k}": v for k, v in moments.state_dict().items()}
        tensors.update({f"trace.{n}": traces[n][self.chain, :draws_done] for n in TRACE_NAMES})
        if sampler is not None:
            tensors.update(self._masters_state())
            tensors.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
            tensors.update({f"stream.{k}": v for k, v in self._stream_state().items()})
            if self._next is not None:  # the next step's gradient, so the resumed chain takes the same step
                tensors[NEXT_LOSS_KEY] = self._next[0]
                tensors.update({f"next.grad.{i}": g for i, g in enumerate(self._next[1])})
        meta = {"draws_done": draws_done, "steps_done": steps_done, "done": summary is not None, "summary": summary}
        eng.checkpoints.save(self.chain, tensors, meta)

    def _masters_state(self) -> Dict[str, torch.Tensor]:
        """The chain's weights as a checkpoint stores them (a chain in lockstep holds its own)."""
        return self.engine.weights.masters_state()

    def _stream_state(self) -> Dict[str, torch.Tensor]:
        """The chain's minibatch stream as a checkpoint stores it (a chain in lockstep holds its own)."""
        return self.engine.stream.state_dict()

    def _summary(self) -> Dict[str, Any]:
        guard, traces = self.run_state.guard, self.run_state.traces
        distance = traces["distance_from_w_star"][self.chain]
        distance = distance[self.traced.to(distance.device)]
        if distance.numel() == 0:  # step_diagnostics=False
            distance = torch.full((1,), math.nan, dtype=torch.float64)
        return {
            "chain": self.chain,
            "initial_mean_loss": guard.init_mean,
            "loss_scale": guard.scale,  # max(L(w*), num_weights / (2 nbeta)): what "far above the start" means
            "mean_loss": float(traces["mean_train_loss"][self.chain].mean()),
            "final_distance_from_w_star": float(distance[-1]),
            "max_distance_from_w_star": float(distance.max()),
        }


def _prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
