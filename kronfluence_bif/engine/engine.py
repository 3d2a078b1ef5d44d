"""The sampling phase: this process's chains of one BIF computation, pooled over chains and processes.

`SamplingEngine.run()` evaluates the values at w* (the shift), creates the run's state (`RunState`, in `_start`),
runs each of this process's chains (`chain.Chain`), and pools: chains by adding their sums, processes by an
all-reduce of the sums (each chain counted once, by the leader of its evaluation group). The model leaves this
module with exactly w*, whatever happens (the caller's `SampledWeights` restores it).

The seams: a chain asks its `Sampler` (`kronfluence_bif.samplers`, chosen by name from the registry, never
branched on here) to step and the `Evaluator` to fill a buffer row; `lockstep.lockstep_plan` decides which chains
advance together (`lockstep.Lockstep`, batched over chains) and which alone (`Chain`), with the same `RunState`,
before the temperature pilot (`engine/temperature.py`), whose chains become the lone chains' first draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.checkpoints import CheckpointStore
from kronfluence_bif.data import MinibatchStream
from kronfluence_bif.diagnostics import float32_rounded
from kronfluence_bif.distributed import ProcessState, WorkPlan
from kronfluence_bif.engine.chain import STEP_TRACES, TRACE_NAMES, RunState, traced_draws
from kronfluence_bif.engine.evaluation import Evaluator, Side, monitor_rows
from kronfluence_bif.engine.gradients import StepGradient
from kronfluence_bif.engine.guards import DivergenceGuard, probe_sharpness
from kronfluence_bif.engine.linear_term import LinearControlVariate
from kronfluence_bif.engine.lockstep import lockstep_plan, run_chains
from kronfluence_bif.engine.seeds import chain_seed
from kronfluence_bif.engine.temperature import choose_temperature
from kronfluence_bif.heap import frozen_heap
from kronfluence_bif.logs import logger
from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.moments import CrossMoments, all_reduce_moments_, place_owned
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.samplers import LinearSpan, SamplerContext
from kronfluence_bif.threads import choose_threads, using_threads
from kronfluence_bif.tracking import untracked_forwards

TQDM_BAR_FORMAT = (
    "{desc} [{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}{postfix} [time left: {remaining}, time spent: {elapsed}]"
)


@dataclass
class SamplingResult:
    """What a run's chains give, pooled over every process: the moment sums, the chains' summaries and traces."""

    moments: Optional[CrossMoments]  # None once the scorer has formed the scores (the sums are dropped then)
    chain_summaries: List[Dict[str, float]] = field(default_factory=list)
    traces: Dict[str, torch.Tensor] = field(default_factory=dict)
    sharpness: Optional[float] = None  # largest preconditioned curvature after burn-in (diagnostics)
    widths: Tuple[int, int] = (1, 1)  # values per train example and per query (per-token runs: T and 1 + T)
    args: Optional[BIFArguments] = None  # what the chains ran with (the temperature pilot's nbeta, localization)
    linear_term: Optional[Dict[str, Any]] = None  # the linear control variate: applied, span rank, variance ratio
    rounded_values: bool = False  # the values at w* look rounded at float32's resolution next to 1 (diagnostics)


class SamplingEngine:
    """Runs this process's chains of one BIF computation and returns the moments pooled over all processes."""

    def __init__(
        self,
        model: nn.Module,
        views: LossViews,
        weights: SampledWeights,
        stream: MinibatchStream,
        x: Side,
        y: Optional[Side],
        args: BIFArguments,
        diagonal: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        disable_tqdm: bool = False,
        state: Optional[ProcessState] = None,
        checkpoints: Optional[CheckpointStore] = None,
        monitor: Optional[List[int]] = None,
    ) -> None:
        """`monitor`: the training rows whose mean loss traces each chain (default: `monitor_rows` of x's rows)."""
        self.model = model
        self.views = views
        self.weights = weights
        self.stream = stream
        self.x, self.y = x, y  # y None: self-influence Var(x), y = x
        self.diagonal = diagonal or y is None  # self-influence pairs example i with itself only
        self.args = args
        self.disable_tqdm = disable_tqdm
        self.state = state if state is not None else ProcessState.local()
        self.checkpoints = checkpoints
        self.device = weights.params[0].device
        scored = self.x.batches.indices
        scored = list(range(self.x.size)) if scored is None else scored
        monitor_index, monitor_side = self._monitor(
            scored, monitor if monitor is not None else monitor_rows(scored, args.seed)
        )
        self.evaluator = Evaluator(
            model, x, y, monitor_index, monitor_side, amp_dtype, self.device, compile_views=args.compile_evaluation
        )
        sharpness = self._sharpness_probe(args)
        self.context = SamplerContext(model, views, weights, stream, self.device, chain_seed(args.seed, 0), sharpness)
        self._temperature_settled = False  # the temperature pilot runs once, in the first `run`
        # the control variate is exactly zero with the full batch: not computed there
        control_variate = bool(args.control_variate) and stream.batch_size < stream.n
        self.gradient = StepGradient(model, views, weights, self.context, control_variate)

    def _monitor(self, scored: List[int], rows: List[int]) -> Tuple[Optional[torch.Tensor], Optional[Side]]:
        """x's rows holding the monitor rows when this job scores them all; else a Side evaluating them apart (with
        x's own view, so the values are computed exactly as in a job that scores them)."""
        position = {r: i for i, r in enumerate(scored)}
        if all(r in position for r in rows):
            return torch.tensor([position[r] for r in rows], dtype=torch.long, device=self.device), None
        return None, Side(self.stream.source.batches(rows, self.x.batches.batch_size), self.x.view)

    def check_views(self) -> None:
        """The per-example contract on the first batch of each side, at w*, in full precision."""
        self.evaluator.check_views(self.diagonal)

    def run(self) -> SamplingResult:
        """This process's chains, then the pooled moments, traces and summaries of all processes.

        Runs with the thread count of `kronfluence_bif.threads.choose_threads` (the caller's is restored after) and
        with the heap alive at the start left out of the garbage collector's scans (`kronfluence_bif.heap`).
        """
        self.weights.reset()
        choice = choose_threads(
            self.args.num_threads,
            self.device,
            lambda: self.views.summed_train_loss(self.x.batches.first(), self.model),
        )
        logger.info("Sampling with %d CPU thread(s): %s.", choice.threads, choice.reason)
        with using_threads(choice.threads), untracked_forwards(self.model), frozen_heap():
            return self._run()

    def _settle_temperature(self, run: RunState, alone: List[int]) -> None:
        """nbeta and localization from the temperature pilot (`engine/temperature.py`), where the arguments ask;
        the chains in `alone` continue from the pilot's draws at the chosen rung."""
        if self._temperature_settled:
            return
        self._temperature_settled = True
        rung = choose_temperature(self, run, alone)
        if rung.args is not self.args:
            self.args = rung.args
            self.context.sharpness = self._sharpness_probe(rung.args)
            run.guard = self._guard(rung.args, run.shift.float(), run.guard.init_mean)
        run.prefixes = rung.prefixes
        if rung.prefixes.get(run.plan.chains[0]) is not None:  # its burn-in, and the probe after it, are done
            run.sharpness = rung.sharpness

    def _sharpness_probe(self, args: BIFArguments):
        """The context's sharpness probe at `args`' nbeta (the scale of the tempered loss it measures)."""
        return partial(probe_sharpness, self.model, self.views, self.weights, self.stream, args)

    def _run(self) -> SamplingResult:
        plan = self.state.plan(self.args.num_chains)
        self.state.make_groups(plan)
        run = self._start(plan)
        together, reason = lockstep_plan(self, run, plan.chains)
        self._settle_temperature(run, [c for c in plan.chains if c not in together])
        total: Optional[CrossMoments] = None
        summaries: List[Dict[str, Any]] = []
        error: Optional[BaseException] = None
        try:
            for moments, summary in run_chains(self, run, plan.chains, together, reason):
                total = moments if total is None else total.merge_(moments)
                summaries.append(summary)
        except Exception as exc:  # noqa: BLE001 - every process must learn of it, or the others would hang
            error = exc
        finally:
            run.bar.close()
        self.state.raise_if_any_failed(error)
        return self._pool(total, run, summaries)

    def _guard(self, args: BIFArguments, shift: torch.Tensor, init_mean: float) -> DivergenceGuard:
        return DivergenceGuard(args, shift, init_mean, sum(p.numel() for p in self.weights.params))

    def _start(self, plan: WorkPlan) -> RunState:
        """The run's state: the layout, the values at w* and the limits they set, the buffers, traces and bar."""
        args = self.args
        lay = self.evaluator.layout(plan)
        f32 = {"dtype": torch.float32, "device": self.device}
        f64 = {"dtype": torch.float64, "device": self.device}
        shift = torch.empty(lay.width, **f32)
        self.weights.reset()  # the shift is the value at w*, whatever ran before (column blocks share the y sums)
        self.evaluator.evaluate(shift, None)
        init_mean = float(self.evaluator.monitor_mean(shift[None], lay)[0])
        guard = self._guard(args, shift, init_mean)
        shape = (args.num_chains, args.num_draws)
        traces = {name: torch.zeros(shape, dtype=torch.float64, device=self.device) for name in TRACE_NAMES[:2]}
        step_traces = torch.zeros((len(STEP_TRACES), *shape), **f64)  # zeros, so processes can add them
        traces.update(zip(STEP_TRACES, step_traces))
        bar = tqdm(
            total=args.num_chains * args.num_draws,
            desc="Sampling BIF draws",
            bar_format=TQDM_BAR_FORMAT,
            disable=self.disable_tqdm or not self.state.is_main_process,
        )
        # the main process advances the bar for its whole group's share, so the ETA covers every process
        scale = args.num_chains / len(plan.chains)
        return RunState(
            plan=plan,
            layout=lay,
            shift=shift.double(),
            buffer=torch.empty(args.draws_per_block, lay.width, **f32),
            step_losses=torch.empty(args.num_burnin_steps + args.num_draws * args.draw_interval, **f32),
            traces=traces,
            step_traces=step_traces,
            guard=guard,
            bar=bar,
            bar_scale=int(scale) if scale.is_integer() else scale,  # "32/1600", not "32.0/1600"
            fused_gradient=not self.gradient.control_variate and self.evaluator.fuses_gradient(self.stream, lay.mine),
        )

    def _agreed_span(self, total: CrossMoments, run: RunState) -> Optional[LinearSpan]:
        """The chains' span where every process has it (one whose Rayleigh-Ritz failed has none); elsewhere the
        coordinate sums are dropped before the all-reduce, so every process reduces the same tensors."""
        span = run.span
        if self.state.distributed and not all(self.state.all_gather_object(span is not None)):
            span, total.coordinates = None, None
        return span

    def _apply_linear_term(self, total: CrossMoments, run: RunState, span: Optional[LinearSpan]) -> Optional[dict]:
        """The linear control variate on the pooled moments, where the chains moved on an exact span; what was done
        (None where it was not asked for)."""
        if not self.args.linear_control_variate:
            return None
        if span is None:
            minibatch = self.stream.batch_size < self.stream.n
            reason = "a minibatch gradient" if minibatch else "no Rayleigh-Ritz values (no double backward)"
            logger.info("linear_control_variate: off for this run (%s).", reason)
            return {"applied": False, "reason": reason}
        share = len(range(run.plan.group, span.rank, run.plan.num_groups))  # the directions split over groups
        logger.info(
            "linear_control_variate: the values' linear part on the %d-dimensional span, by %d evaluations at w*%s.",
            span.rank,
            2 * share,
            "" if share == span.rank else f" (this process's share of {2 * span.rank})",
        )
        term, error = None, None
        try:
            term = LinearControlVariate.by_secants(self, run, span)
        except Exception as exc:  # noqa: BLE001 - every process must learn of it, or the others would hang
            error = exc
        self.state.raise_if_any_failed(error)
        if term is None:
            total.coordinates = None
            logger.info("linear_control_variate: off (a value at w* +- one standard deviation is not finite).")
            return {"applied": False, "reason": "values at w* +- one posterior standard deviation are not finite"}
        ratio = term.apply_(total)
        return {"applied": True, "span_rank": span.rank, "coordinate_variance_ratio": ratio}

    def _pool(self, total: CrossMoments, run: RunState, summaries: List[Dict[str, Any]]) -> SamplingResult:
        """Add the sums of every process (each chain counted once: by the leader of its group)."""
        plan, lay, state, traces = run.plan, run.layout, self.state, run.traces
        sharpness = run.sharpness
        if lay.own is not None:
            total = place_owned(total, lay.own, lay.dim_x, lay.dim_y, with_y=plan.is_group_leader)
        span = self._agreed_span(total, run)
        if state.distributed:
            if not plan.is_group_leader:
                for t in traces.values():
                    t.zero_()
            all_reduce_moments_(total, state.all_reduce_sum_, list(traces.values()), counted=plan.is_group_leader)
            gathered = state.all_gather_object((summaries if plan.is_group_leader else [], sharpness))
            summaries = sorted((s for part, _ in gathered for s in part), key=lambda s: s["chain"])
            found = [v for _, v in gathered if v is not None]
            sharpness = max(found) if found else None
        linear_term = self._apply_linear_term(total, run, span)
        # untraced draws (between STEP_TRACE_INTERVAL-th draws, or all without step_diagnostics) read NaN, not 0
        run.step_traces[:, :, ~traced_draws(self.args).to(run.step_traces.device)] = math.nan
        return SamplingResult(
            moments=total,
            chain_summaries=summaries,
            traces={k: v.cpu().clone() for k, v in traces.items()},  # own storage each: the step traces share one
            sharpness=sharpness,
            widths=(self.x.width, self.y.width if self.y is not None else 1),
            args=self.args,
            linear_term=linear_term,
            rounded_values=float32_rounded(run.shift[: lay.n_x + lay.n_y]),
        )
