"""The sampling phase: chains x draws of SGLD, evaluating every example at every kept draw.

Per draw the engine evaluates the per-example values x (train losses of the scored examples) and y (query
measurements, or the same examples' measurements for self scores) into one buffer row. The chain's health trace
`mean_train_loss` is the mean loss of the monitor rows, a fixed sample of the request's scored rows: taken from x
when this job scores them all, evaluated apart (a data-partition job) otherwise, so every job of a request
reports the same diagnostics. Every
`draws_per_block` draws updates the float64 moments with one GEMM, checking for divergence at the same time
(one host sync per block). Each chain keeps its own moments, checkpointed at block boundaries, and the
process's chains are pooled at the end; processes then add their sums. The model leaves this module with
exactly w*, whatever happens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.checkpoints import CheckpointStore
from kronfluence_bif.curvature import CurvatureSketch, sketch_fisher
from kronfluence_bif.data import EvalBatches, MinibatchStream
from kronfluence_bif.diagnostics import preconditioned_sharpness
from kronfluence_bif.distributed import ProcessState, WorkPlan, split_evenly
from kronfluence_bif.errors import SamplerDivergenceError
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.loss_views import LossViews, PerExampleView
from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.sampler import SGLD, RMSpropSGLD, SketchSGLD
from kronfluence_bif.threads import choose_threads, using_threads

TQDM_BAR_FORMAT = (
    "{desc} [{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}{postfix} [time left: {remaining}, time spent: {elapsed}]"
)
TRACE_NAMES = (
    "mean_train_loss",
    "mean_measurement",
    "distance_from_w_star",
    "gradient_step_norm",  # |eps/2 G nbeta/m sum grad|: the move towards lower loss in the step before a draw
    "localization_step_norm",  # |eps/2 G gamma (w - w*)|: the pull back towards w*
    "noise_step_norm",  # |sqrt(eps G) xi|: the injected noise
)
NORM_TRACES = TRACE_NAMES[3:]
# scored training examples whose mean loss is a chain's mean_train_loss trace (its health): all up to this many
MONITOR_ROWS = 512


def monitor_rows(scored: Sequence[int], seed: int) -> List[int]:
    """The training rows traced by `mean_train_loss`: the request's scored rows (all of them, before data
    partitions) up to MONITOR_ROWS, else a sample of them seeded by `seed` only.

    They do not depend on which partition a job computes (or on column blocks), so the traces, R-hat and warnings
    are a property of the chains: identical in every partition job and in the unpartitioned run.
    """
    scored = [int(r) for r in scored]
    if len(scored) <= MONITOR_ROWS:
        return scored
    generator = torch.Generator().manual_seed(chain_seed(seed, 0) ^ 0x3017)
    return sorted(scored[int(i)] for i in torch.randperm(len(scored), generator=generator)[:MONITOR_ROWS])


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`: depends on (seed, chain) only, never on the process layout."""
    return int(np.random.SeedSequence([seed, chain, 0xB1F]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Side:
    """One side of the covariance: which batches, which per-example view, and an optional reduction."""

    batches: EvalBatches
    view: PerExampleView
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # [k, n_raw] -> [k, n_out]

    @property
    def size(self) -> int:
        return self.batches.size

    @property
    def width(self) -> int:
        """Values per example: 1, or the tokens of a per-token view (known once the view was checked)."""
        return int(getattr(self.view, "width", None) or 1)

    @property
    def columns(self) -> int:
        return self.size * self.width

    def batch_sizes(self) -> List[int]:
        step = self.batches.batch_size
        return [min(step, self.size - start) for start in range(0, self.size, step)]


@dataclass
class SamplingResult:
    moments: CrossMoments
    chain_summaries: List[Dict[str, float]] = field(default_factory=list)
    traces: Dict[str, torch.Tensor] = field(default_factory=dict)
    sharpness: Optional[float] = None  # largest preconditioned curvature after burn-in (diagnostics)
    widths: Tuple[int, int] = (1, 1)  # values per train example and per query (per-token runs: T and 1 + T)
    token_scores: Optional[torch.Tensor] = None  # [q, Tq, n, T] when the query side has token values
    scores: Optional[torch.Tensor] = None  # set when column blocks were pooled into scores already


@dataclass
class _Layout:
    """Where each evaluated value goes, and which part of the work is this process's."""

    n_x: int
    n_y: int
    n_m: int  # monitor columns evaluated apart (0 when this job scores every monitor row)
    dim_x: int
    dim_y: int
    mine: Optional[set]  # (side, batch) units this process evaluates; None: all of them
    gather_columns: List[torch.Tensor]  # buffer columns evaluated by each member of the group
    own: Optional[torch.Tensor]  # output columns (of dim_x) this process accumulates; None: all


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
        self.amp_dtype = amp_dtype
        self.disable_tqdm = disable_tqdm
        self.state = state if state is not None else ProcessState.local()
        self.checkpoints = checkpoints
        self.device = weights.params[0].device
        self._checked_steps = 0
        self._sharpness: Optional[float] = None
        self._sketch: Optional[CurvatureSketch] = None
        scored = self.x.batches.indices
        scored = list(range(self.x.size)) if scored is None else scored
        self._monitor_rows, self.monitor = self._monitor(
            scored, monitor if monitor is not None else monitor_rows(scored, args.seed)
        )

    def _monitor(self, scored: List[int], rows: List[int]) -> Tuple[Optional[torch.Tensor], Optional[Side]]:
        """x's rows holding the monitor rows when this job scores them all; else a Side evaluating them apart (with
        x's own view, so the values are computed exactly as in a job that scores them)."""
        position = {r: i for i, r in enumerate(scored)}
        if all(r in position for r in rows):
            return torch.tensor([position[r] for r in rows], dtype=torch.long, device=self.device), None
        return None, Side(self.stream.source.batches(rows, self.x.batches.batch_size), self.x.view)

    # ------------------------------------------------------------------ evaluation
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _sides(self) -> List[Side]:
        return [self.x] if self.y is None else [self.x, self.y]

    def _evaluate(self, row: torch.Tensor, mine: Optional[set]) -> None:
        """Per-example values of both sides (only this process's batches when sharded), then of the monitor rows
        (every process), into `row` [n_x + n_y + n_m]."""
        offset = 0
        with torch.inference_mode(), self._autocast():
            for s, side in enumerate(self._sides()):
                for b, batch in enumerate(side.batches):
                    size = min(side.batches.batch_size, side.size - b * side.batches.batch_size) * side.width
                    if mine is None or (s, b) in mine:
                        values = side.view(batch, self.model)
                        row[offset : offset + size] = values.reshape(-1)
                    offset += size
            if self.monitor is not None:
                for batch in self.monitor.batches:
                    values = self.monitor.view(batch, self.model).reshape(-1)
                    row[offset : offset + values.numel()] = values
                    offset += values.numel()

    def check_views(self) -> None:
        """The per-example contract on the first batch of each side, at w*, in full precision."""
        names = ["train_dataset", "train_dataset" if self.diagonal else "query_dataset"]
        with torch.inference_mode():
            for side, name in zip(self._sides(), names):
                side.view.check(side.batches.first(), self.model, dataset=name)

    def _layout(self, plan: WorkPlan) -> _Layout:
        n_x = self.x.columns
        n_y = self.y.columns if self.y is not None else 0
        n_m = self.monitor.columns if self.monitor is not None else 0
        dim_x = reduced_dim(self.x, n_x)
        dim_y = dim_x if self.y is None else reduced_dim(self.y, n_y)
        if plan.num_shards == 1:
            return _Layout(n_x, n_y, n_m, dim_x, dim_y, None, [], None)
        units, columns, offset = [], [], 0
        for s, side in enumerate(self._sides()):
            for b, size in enumerate(side.batch_sizes()):
                units.append((s, b))
                columns.append(torch.arange(offset, offset + size * side.width))
                offset += size * side.width
        parts = split_evenly([c.numel() for c in columns], plan.num_shards)
        gather = [torch.cat([columns[u] for u in part]) if part else torch.empty(0, dtype=torch.long) for part in parts]
        own = torch.tensor(np.array_split(np.arange(dim_x), plan.num_shards)[plan.shard], dtype=torch.long)
        mine = {units[u] for u in parts[plan.shard]}
        return _Layout(n_x, n_y, n_m, dim_x, dim_y, mine, gather, own.to(self.device))

    # ------------------------------------------------------------------ sampling
    def _make_sampler(self, chain: int) -> SGLD:
        generator = torch.Generator(device=self.device).manual_seed(chain_seed(self.args.seed, chain))
        common = dict(
            params=self.weights.masters,
            anchors=self.weights.anchors,
            step_size=self.args.step_size,
            nbeta=self.args.nbeta,
            localization=self.args.localization,
            generator=generator,
        )
        if self.args.sampler == "rmsprop_sgld":
            return RMSpropSGLD(alpha=self.args.rmsprop_alpha, eps=self.args.rmsprop_eps, **common)
        if self.args.sampler == "sketch_sgld":
            return SketchSGLD(sketch=self._curvature_sketch(), **common)
        return SGLD(**common)

    def _curvature_sketch(self) -> CurvatureSketch:
        """The Fisher sketch at w* shared by every chain (deterministic in the seed, so processes agree)."""
        if self._sketch is None:
            args = self.args
            m = min(self.stream.batch_size, self.stream.n)
            rows = torch.Generator().manual_seed(chain_seed(args.seed, 0) ^ 0xC0FFEE)
            batches = [
                self.stream.source.gather(torch.randperm(self.stream.n, generator=rows)[:m])
                for _ in range(args.sketch_rank)
            ]
            self.weights.reset()
            devices = [self.device] if self.device.type == "cuda" else []
            ignored = []  # per batch: did sample=True give exactly the true-label loss?

            def sampled(batch: Any) -> torch.Tensor:
                loss = self.views.sampled_train_loss(batch, self.model)
                if all(ignored):  # one batch whose sampled loss differs settles it: no more extra forward passes
                    with torch.no_grad():
                        plain = self.views.summed_train_loss(batch, self.model)
                    ignored.append(bool(torch.equal(loss.detach(), plain)))
                return loss

            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(chain_seed(args.seed, 0) ^ 0xF15E)
                sketch = sketch_fisher(sampled, batches, self.weights.params, m)
            if all(ignored):
                # a confident classifier can sample its own labels on a few batches, but not on all K x m examples
                warn_once(
                    "sketch-no-sampling",
                    "The Task's compute_train_loss(sample=True) returned the true-label loss on every one of the "
                    f"{len(ignored)} sketch batches, so sketch_sgld's curvature sketch is the empirical Fisher, which "
                    "underestimates the curvature of a well-fitted model; the sketch is rescaled by the measured "
                    "curvature. Sample targets from the model's predictive distribution when sample=True (as for "
                    "kronfluence's true Fisher).",
                )
            self._sketch = self._stabilize(sketch)
        return self._sketch

    def _stabilize(self, sketch: CurvatureSketch) -> CurvatureSketch:
        """Scale the sketch up while step_size x lambda_max(G A) > 2 on a minibatch (Hessian-vector products).

        A sketch that underestimates the curvature (a Task that ignores sample=True, a loss whose Hessian exceeds
        its Fisher) would make the chain unstable (SGLD needs step_size x lambda_max(G A) < 4; above 2 the variance
        along that direction is more than doubled). When scaling does not lower the excess, the sharp direction
        lies outside the sketch: the last scaling is undone (it would only slow the sketched directions down).
        """
        args = self.args
        previous: Optional[Tuple[CurvatureSketch, float]] = None
        for _ in range(4):
            probe = SketchSGLD(
                self.weights.masters,
                self.weights.anchors,
                args.step_size,
                args.nbeta,
                args.localization,
                torch.Generator(device=self.device),
                sketch,
            )
            lam = self._sharpness_on_probe_batch(probe.apply_root, args.localization)
            if lam is None:  # no double backward: keep the sketch as built
                return sketch
            excess = args.step_size * lam
            if previous is not None and excess > 0.8 * previous[1]:
                logger.info(
                    "Curvature sketch: step_size x lambda_max(G A) = %.3g after scaling (%.3g before): the sharp "
                    "direction is outside the sketch; raise `sketch_rank` or lower `step_size` if chains misbehave.",
                    excess,
                    previous[1],
                )
                return previous[0]
            if not math.isfinite(excess) or excess <= 2.0:
                return sketch
            logger.info("Curvature sketch: step_size x lambda_max(G A) = %.3g > 2; scaling the sketch up.", excess)
            previous = (sketch, excess)
            sketch = CurvatureSketch(basis=sketch.basis, eigenvalues=sketch.eigenvalues * excess)
        return sketch

    def _sgld_step(self, sampler: SGLD, losses: torch.Tensor, index: int) -> None:
        batch = self.stream.next()
        with torch.enable_grad():
            loss = self.views.summed_train_loss(batch, self.model)
        grads = torch.autograd.grad(loss, self.weights.params)
        sampler.step(grads, self.stream.batch_size)
        self.weights.sync()
        losses[index] = loss.detach()

    def run(self) -> SamplingResult:
        """This process's chains, then the pooled moments, traces and summaries of all processes.

        Runs with the thread count of `kronfluence_bif.threads.choose_threads`; the caller's is restored after.
        """
        self.weights.reset()
        choice = choose_threads(
            self.args.num_threads,
            self.device,
            lambda: self.views.summed_train_loss(self.x.batches.first(), self.model),
        )
        logger.info("Sampling with %d CPU thread(s): %s.", choice.threads, choice.reason)
        with using_threads(choice.threads):
            return self._run()

    def _run(self) -> SamplingResult:
        args = self.args
        plan = self.state.plan(args.num_chains)
        self.state.make_groups(plan)
        self._plan = plan
        self._lay = lay = self._layout(plan)
        f32 = {"dtype": torch.float32, "device": self.device}
        shift = torch.empty(lay.n_x + lay.n_y + lay.n_m, **f32)
        self.weights.reset()  # the shift is the value at w*, whatever ran before (column blocks share the y sums)
        self._evaluate(shift, None)
        init_mean = float(self._monitor_mean(shift[None])[0])
        if not math.isfinite(init_mean) or not bool(torch.isfinite(shift).all()):
            raise SamplerDivergenceError(
                "The losses/measurements at the trained weights w* are not finite; BIF cannot start. "
                "Check the model and the Task."
            )
        self._init_mean = init_mean
        # the loss a healthy chain reaches is about L(w*) + d / (2 nbeta) (equipartition), so the limit scales the
        # larger of the two: a model that interpolates (L(w*) ~ 0) must not trip it on its first draw
        thermal = sum(p.numel() for p in self.weights.params) / (2.0 * args.nbeta)
        self._scale = max(init_mean, thermal)
        self._limit = args.divergence_loss_ratio * self._scale if self._scale > 0 else math.inf
        self._shift = shift.double()
        self._buffer = torch.empty(args.draws_per_block, lay.n_x + lay.n_y + lay.n_m, **f32)
        self._step_losses = torch.empty(args.num_burnin_steps + args.num_draws * args.draw_interval, **f32)
        traces = {
            name: torch.zeros(args.num_chains, args.num_draws, dtype=torch.float64, device=self.device)
            for name in TRACE_NAMES
        }
        if args.sampler == "rmsprop_sgld" and args.num_burnin_steps == 0:
            warn_once(
                "rmsprop-no-burnin",
                "RMSprop-SGLD with num_burnin_steps=0: its preconditioner starts from V=0 (the largest steps), "
                "so early draws are biased. Set num_burnin_steps > 0 (the default is 100).",
            )
        bar = tqdm(
            total=args.num_chains * args.num_draws,
            desc="Sampling BIF draws",
            bar_format=TQDM_BAR_FORMAT,
            disable=self.disable_tqdm or not self.state.is_main_process,
        )
        # the main process advances the bar for its whole group's share, so the ETA covers every process
        scale = args.num_chains / len(plan.chains)
        self._bar, self._bar_scale = bar, int(scale) if scale.is_integer() else scale  # "32/1600", not "32.0/1600"
        total: Optional[CrossMoments] = None
        summaries: List[Dict[str, Any]] = []
        error: Optional[BaseException] = None
        try:
            for chain in plan.chains:
                moments, summary = self._run_chain(chain, traces)
                total = moments if total is None else total.merge_(moments)
                summaries.append(summary)
        except Exception as exc:  # noqa: BLE001 - every process must learn of it, or the others would hang
            error = exc
        finally:
            bar.close()
        self.state.raise_if_any_failed(error)
        return self._pool(total, traces, summaries)

    def _run_chain(self, chain: int, traces: Dict[str, torch.Tensor]) -> Tuple[CrossMoments, Dict[str, Any]]:
        args, lay = self.args, self._lay
        own_x = lay.dim_x if lay.own is None else lay.own.numel()
        own_y = own_x if self.diagonal else lay.dim_y
        moments = CrossMoments(own_x, own_y, diagonal=self.diagonal, device=self.device)
        self.weights.reset()
        sampler = self._make_sampler(chain)
        self.stream.reset(torch.Generator().manual_seed(chain_seed(args.seed, chain) ^ 0x5EED))
        start, step = 0, 0
        resumed = self.checkpoints.load(chain) if self.checkpoints is not None else None
        if self._plan.num_shards > 1 and self.checkpoints is not None:
            # the members of a group exchange values every block, so they resume from the same draw or not at all
            where = None if resumed is None else (resumed[1]["draws_done"], resumed[1]["done"])
            if len(set(self.state.group_all_gather_object(where, self._plan.group_ranks))) != 1:
                logger.warning("Chain %d: the group's checkpoints disagree; the chain starts over.", chain)
                resumed = None
        if resumed is not None:
            tensors, meta = resumed
            moments = CrossMoments.from_state_dict(_prefixed(tensors, "moments."), self.device)
            start, step = int(meta["draws_done"]), int(meta["steps_done"])
            for name in TRACE_NAMES:
                traces[name][chain, :start] = tensors[f"trace.{name}"].to(self.device)
            self._bar.update(start * self._bar_scale)
            if meta["done"]:
                logger.info("Chain %d: complete in its checkpoint; not sampled again.", chain)
                return moments, meta["summary"]
            self.weights.load_masters_state(tensors)
            sampler.load_state_dict(_prefixed(tensors, "sampler."))
            self.stream.load_state_dict(_prefixed(tensors, "stream."))
            logger.info("Chain %d: resuming from its checkpoint at draw %d of %d.", chain, start, args.num_draws)
        else:
            for _ in range(args.num_burnin_steps):
                self._sgld_step(sampler, self._step_losses, step)
                step += 1
            if args.freeze_preconditioner:
                sampler.freeze()
            if self._sharpness is None:
                self._sharpness = self._estimate_sharpness(sampler)
        self._checked_steps = 0 if resumed is None else step
        self._check_steps(self._step_losses[:step], chain)
        filled, first = 0, start
        # with an evaluation group, a member that fails keeps pace with its partners until the next exchange, where
        # every member learns of it (otherwise the partners would wait forever in the exchange)
        failure: Optional[BaseException] = None
        for draw in range(start, args.num_draws):
            if failure is None:
                try:
                    step = self._draw(sampler, step, filled, chain, draw, traces)
                except Exception as exc:  # noqa: BLE001 - re-raised at the group's next exchange
                    failure = self._defer(exc)
            filled += 1
            if filled == args.draws_per_block or draw == args.num_draws - 1:
                self._agree(failure, chain)
                self._flush(moments, filled, chain, first, traces)
                self._check_steps(self._step_losses[:step], chain)
                self._bar.update(filled * self._bar_scale)
                before, first, filled = first, first + filled, 0
                if first < args.num_draws and self._checkpoint_due(before, first):
                    try:
                        self._save(chain, moments, traces, first, step, sampler, None)
                    except Exception as exc:  # noqa: BLE001 - re-raised at the group's next exchange
                        failure = self._defer(exc)
        summary = self._summary(chain, traces)
        if self.checkpoints is not None:
            try:
                self._save(chain, moments, traces, args.num_draws, step, None, summary)
            except Exception as exc:  # noqa: BLE001 - re-raised just below, on every member
                failure = self._defer(exc)
        self._agree(failure, chain)
        if self._plan.is_group_leader:
            logger.info(
                "Chain %d: mean train loss %.4g at w*, %.4g over draws; distance from w* %.3g at the end, "
                "%.3g at most.",
                chain,
                summary["initial_mean_loss"],
                summary["mean_loss"],
                summary["final_distance_from_w_star"],
                summary["max_distance_from_w_star"],
            )
        return moments, summary

    def _draw(self, sampler: SGLD, step: int, row: int, chain: int, draw: int, traces) -> int:
        """SGLD steps up to the next kept draw, then its evaluation into buffer row `row`; returns the step count."""
        for k in range(self.args.draw_interval):
            sampler.track_norms = k == self.args.draw_interval - 1
            self._sgld_step(sampler, self._step_losses, step)
            step += 1
        self._evaluate(self._buffer[row], self._lay.mine)
        traces["distance_from_w_star"][chain, draw] = self.weights.distance_from_anchor()
        for name, value in zip(NORM_TRACES, sampler.last_norms):
            traces[name][chain, draw] = value
        return step

    def _defer(self, exc: BaseException) -> BaseException:
        """Alone, fail now; in an evaluation group, hold the error until the group's next exchange."""
        if self._plan.num_shards == 1:
            raise exc
        return exc

    def _agree(self, failure: Optional[BaseException], chain: int) -> None:
        """In an evaluation group: every member raises when any member failed (one small exchange per block)."""
        if self._plan.num_shards == 1:
            return
        report = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = self.state.group_all_gather_object(report, self._plan.group_ranks)
        if failure is not None:
            raise failure
        for rank, message in zip(self._plan.group_ranks, reports):
            if message is not None:
                raise RuntimeError(f"Process {rank} of this evaluation group failed on chain {chain}: {message}")

    def _mean_x(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the scored train examples of their value (per-token values summed per example), per draw."""
        return values.double().sum(1) / max(self.x.size, 1)

    def _monitor_mean(self, block: torch.Tensor) -> torch.Tensor:
        """Mean loss of the monitor rows (per-token values summed per example) for each draw of a
        [k, n_x + n_y + n_m] block: the chain's health trace."""
        k, width = block.shape[0], self.x.width
        if self._monitor_rows is not None:
            values = block[:, : self._lay.n_x].reshape(k, -1, width)[:, self._monitor_rows]
        else:
            values = block[:, self._lay.n_x + self._lay.n_y :].reshape(k, -1, width)
        return values.double().sum(-1).mean(1)

    def _mean_y(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over queries of the (sequence) measurement: column 0 of each query's [1 + T] values."""
        values = values.double()
        if self.y.width > 1:
            values = values.view(values.shape[0], self.y.size, self.y.width)[..., 0]
        return values.mean(1)

    def _estimate_sharpness(self, sampler: SGLD) -> Optional[float]:
        """lambda_max of G^1/2 (nbeta/m H) G^1/2 on a fixed minibatch; None when double backward fails."""
        # the localization's own limit is checked by BIFArguments
        return self._sharpness_on_probe_batch(sampler.apply_root, localization=0.0)

    def _sharpness_on_probe_batch(self, apply_root, localization: float) -> Optional[float]:
        """lambda_max of G^1/2 (nbeta/m H + localization) G^1/2 on the seeded probe minibatch; None on failure."""
        m = self.stream.batch_size
        rows = torch.randperm(self.stream.n, generator=torch.Generator().manual_seed(self.args.seed))[:m]
        batch = self.stream.source.gather(rows)
        try:
            return preconditioned_sharpness(
                lambda: self.views.summed_train_loss(batch, self.model),
                self.weights.params,
                scale=self.args.nbeta / m,
                localization=localization,
                preconditioner=apply_root,
                generator=torch.Generator().manual_seed(self.args.seed),
            )
        except Exception as exc:  # noqa: BLE001 - a diagnostic or a check must never stop the run
            logger.debug("Sharpness estimate skipped: %s", exc)
            return None

    def _checkpoint_due(self, before: int, after: int) -> bool:
        every = self.args.checkpoint_interval
        return self.checkpoints is not None and every > 0 and after // every > before // every

    def _flush(self, moments: CrossMoments, filled: int, chain: int, first: int, traces: Dict[str, torch.Tensor]):
        """Exchange the group's shards, check, shift by the values at w*, reduce, and add the block."""
        lay = self._lay
        block = self._buffer[:filled]
        self.state.all_gather_columns(block, lay.gather_columns, self._plan.group_ranks)
        bx, by = block[:, : lay.n_x], block[:, lay.n_x : lay.n_x + lay.n_y]
        mean_loss = self._monitor_mean(block)
        self._raise_if_diverged(mean_loss, block, chain, first)
        traces["mean_train_loss"][chain, first : first + filled] = mean_loss
        traces["mean_measurement"][chain, first : first + filled] = self._mean_y(by) if lay.n_y else self._mean_x(bx)
        x = bx.double() - self._shift[: lay.n_x]
        if self.x.reduce is not None:
            x = self.x.reduce(x)
        if self.y is None:
            y = x
        else:
            y = by.double() - self._shift[lay.n_x : lay.n_x + lay.n_y]
            if self.y.reduce is not None:
                y = self.y.reduce(y)
        if lay.own is not None:
            x = x[:, lay.own]
            y = y[:, lay.own] if self.diagonal else y
        moments.update(x, y)

    def _save(self, chain, moments, traces, draws_done, steps_done, sampler, summary) -> None:
        tensors = {f"moments.{k}": v for k, v in moments.state_dict().items()}
        tensors.update({f"trace.{n}": traces[n][chain, :draws_done] for n in TRACE_NAMES})
        if sampler is not None:
            tensors.update(self.weights.masters_state())
            tensors.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
            tensors.update({f"stream.{k}": v for k, v in self.stream.state_dict().items()})
        meta = {"draws_done": draws_done, "steps_done": steps_done, "done": summary is not None, "summary": summary}
        self.checkpoints.save(chain, tensors, meta)

    def _summary(self, chain: int, traces: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        distance = traces["distance_from_w_star"][chain]
        return {
            "chain": chain,
            "initial_mean_loss": self._init_mean,
            "loss_scale": self._scale,  # max(L(w*), num_weights / (2 nbeta)): what "far above the start" means
            "mean_loss": float(traces["mean_train_loss"][chain].mean()),
            "final_distance_from_w_star": float(distance[-1]),
            "max_distance_from_w_star": float(distance.max()),
        }

    def _pool(self, total: CrossMoments, traces, summaries) -> SamplingResult:
        """Add the sums of every process (each chain counted once: by the leader of its group)."""
        plan, lay, state = self._plan, self._lay, self.state
        if lay.own is not None:
            full = CrossMoments(lay.dim_x, lay.dim_y, diagonal=self.diagonal, device=self.device)
            full.sum_x[lay.own] = total.sum_x
            full.sum_xx[lay.own] = total.sum_xx
            if self.diagonal:
                for name in ("sum_y", "sum_yy", "sum_xy"):
                    getattr(full, name)[lay.own] = getattr(total, name)
            else:
                full.sum_xy[:, lay.own] = total.sum_xy
                if plan.is_group_leader:
                    full.sum_y.copy_(total.sum_y)
                    full.sum_yy.copy_(total.sum_yy)
            full.count = total.count
            total = full
        if state.distributed:
            count = torch.tensor([total.count if plan.is_group_leader else 0], dtype=torch.float64)
            if not plan.is_group_leader:
                for t in traces.values():
                    t.zero_()
            state.all_reduce_sum_(
                [count, total.sum_x, total.sum_y, total.sum_xx, total.sum_yy, total.sum_xy, *traces.values()]
            )
            total.count = int(count.item())
            gathered = state.all_gather_object((summaries if plan.is_group_leader else [], self._sharpness))
            summaries = sorted((s for part, _ in gathered for s in part), key=lambda s: s["chain"])
            found = [v for _, v in gathered if v is not None]
            self._sharpness = max(found) if found else None
        return SamplingResult(
            moments=total,
            chain_summaries=summaries,
            traces={k: v.cpu() for k, v in traces.items()},
            sharpness=self._sharpness,
            widths=(self.x.width, self.y.width if self.y is not None else 1),
        )

    # ------------------------------------------------------------------ checks
    def _raise_if_diverged(self, means, block, chain: int, first_draw: int) -> None:
        """Non-finite values, or a draw whose mean train loss passed divergence_loss_ratio times its value at w*."""
        finite = torch.isfinite(block).all(1)
        bad = (~finite) | (means > self._limit)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            what = "non-finite losses" if not bool(finite[k]) else f"mean train loss {float(means[k]):.4g}"
            self._raise(chain, f"draw {first_draw + k}", what)

    def _check_steps(self, losses: torch.Tensor, chain: int) -> None:
        """Non-finite minibatch losses among the steps not checked yet."""
        new = losses[self._checked_steps :]
        if new.numel() and not bool(torch.isfinite(new).all()):
            k = self._checked_steps + int((~torch.isfinite(new)).nonzero()[0, 0])
            self._raise(chain, f"SGLD step {k}", "a non-finite minibatch loss")
        self._checked_steps = losses.numel()

    def _raise(self, chain: int, where: str, what: str) -> None:
        a = self.args
        raise SamplerDivergenceError(
            f"SGLD chain {chain} diverged at {where}: {what} (mean train loss at w* was {self._init_mean:.4g}; "
            f"the limit is divergence_loss_ratio={a.divergence_loss_ratio:g} times {self._scale:.4g}, the larger of "
            "that and the thermal scale num_weights / (2 nbeta)). Lower "
            f"`step_size` (now {a.step_size:g}) or `nbeta` (now {a.nbeta:g}), or raise `localization` "
            f"(now {a.localization:g}) in BIFArguments. No scores were written; the model is unchanged."
        )


def reduced_dim(side: Side, n_raw: int) -> int:
    """Columns of a side after its reduction (aggregated gradients), for `n_raw` raw values."""
    if side.reduce is None:
        return n_raw
    return int(side.reduce(torch.zeros(1, n_raw)).shape[1])


def _prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
