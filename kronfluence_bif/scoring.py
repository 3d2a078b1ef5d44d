"""BIF pairwise and self scores: validate, record arguments, sample once, write kronfluence's files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.module.utils import make_modules_partition
from torch import nn
from torch.utils import data

from kronfluence_bif import storage
from kronfluence_bif.arguments import RUN_CONTROL_FIELDS, BIFArguments
from kronfluence_bif.checkpoints import CheckpointStore, fingerprint, remove_checkpoints
from kronfluence_bif.compare import jsonable
from kronfluence_bif.data import DatasetOnDevice, MinibatchStream
from kronfluence_bif.diagnostics import merge_module_reports, summarize
from kronfluence_bif.distributed import ProcessState, process_state, unwrap_model
from kronfluence_bif.engine import SamplingEngine, SamplingResult, Side, monitor_rows, reduced_dim
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.parameters import SampledWeights, module_units, select_parameters
from kronfluence_bif.tracking import tracked_module_names

# ScoreArguments fields that have no meaning for BIF (no gradients, no preconditioner): warned once when set.
IGNORED_SCORE_FIELDS = {
    "damping_factor": "`localization` (gamma) in BIFArguments plays the role of damping",
    "offload_activations_to_cpu": "BIF stores no activations",
    "query_gradient_accumulation_steps": "BIF computes no query gradients",
    "query_gradient_low_rank": "BIF computes no query gradients",
    "use_full_svd": "BIF computes no query gradients",
    "query_gradient_svd_dtype": "BIF computes no query gradients",
    "per_sample_gradient_dtype": "BIF computes no per-sample gradients",
    "precondition_dtype": "BIF has no preconditioner",
}


@dataclass
class ScoreRequest:
    """Everything `compute_pairwise_scores` / `compute_self_scores` received, normalized."""

    kind: str  # "pairwise" | "self"
    scores_name: str
    factors_name: str
    train_dataset: data.Dataset
    query_dataset: Optional[data.Dataset]
    per_device_query_batch_size: Optional[int]
    per_device_train_batch_size: Optional[int]
    initial_per_device_train_batch_size_attempt: int
    query_indices: Optional[Sequence[int]]
    train_indices: Optional[Sequence[int]]
    dataloader_params: Dict[str, Any]
    score_args: ScoreArguments
    target_data_partitions: Optional[Union[int, Sequence[int]]]
    target_module_partitions: Optional[Union[int, Sequence[int]]]
    overwrite_output_dir: bool


def as_dtype(value: Any) -> Optional[torch.dtype]:
    """ScoreArguments dtypes come back from JSON as strings such as 'torch.float32'."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {value!r}.")
    return dtype


# ---------------------------------------------------------------------------------------------- validation
def validate_request(req: ScoreRequest) -> None:
    """Raise before anything is written: every message names the argument and the fix."""
    for name, dataset in (("train_dataset", req.train_dataset), ("query_dataset", req.query_dataset)):
        if dataset is None and name == "query_dataset" and req.kind == "self":
            continue
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"`{name}` must be a map-style torch Dataset with __len__ and __getitem__.")
        if len(dataset) == 0:
            raise ValueError(f"`{name}` is empty; BIF needs at least one example in it.")
    _check_batch_size("per_device_train_batch_size", req.per_device_train_batch_size, optional=True)
    _check_batch_size(
        "initial_per_device_train_batch_size_attempt", req.initial_per_device_train_batch_size_attempt, optional=False
    )
    if req.kind == "pairwise":
        _check_batch_size("per_device_query_batch_size", req.per_device_query_batch_size, optional=False)
        _check_indices("query_indices", req.query_indices, len(req.query_dataset))
    _check_indices("train_indices", req.train_indices, len(req.train_dataset))
    _check_partitions(req)


def _check_partitions(req: ScoreRequest) -> None:
    args = req.score_args
    for name in ("data_partitions", "module_partitions"):
        if getattr(args, name) < 1:
            raise ValueError(f"`ScoreArguments.{name}` must be >= 1, got {getattr(args, name)}.")
    unpartitioned = args.data_partitions == 1 and args.module_partitions == 1
    if unpartitioned and (req.target_data_partitions is not None or req.target_module_partitions is not None):
        raise ValueError(
            "`target_data_partitions` or `target_module_partitions` were given, but `ScoreArguments` has "
            "`data_partitions` = `module_partitions` = 1. Set the partition counts > 1 or leave the targets as None."
        )
    n_scored = len(req.train_indices) if req.train_indices is not None else len(req.train_dataset)
    if args.data_partitions > n_scored:
        raise ValueError(
            f"Data partition size ({args.data_partitions}) exceeds the number of scored training examples "
            f"({n_scored}). Reduce `ScoreArguments.data_partitions`."
        )
    for name, count in (("data", args.data_partitions), ("module", args.module_partitions)):
        for p in _targets(getattr(req, f"target_{name}_partitions"), count):
            if not 0 <= p < count:
                raise ValueError(
                    f"Invalid {name} partition {p} in `target_{name}_partitions`: must be in [0, {count})."
                )


def _check_batch_size(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_indices(name: str, indices: Optional[Sequence[int]], size: int) -> None:
    if indices is None:
        return
    indices = list(indices)
    if not indices:
        raise ValueError(f"`{name}` is empty; pass None to use every example, or at least one index.")
    bad = [i for i in indices if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < size]
    if bad:
        raise ValueError(f"`{name}` holds indices outside [0, {size}) of its dataset: {bad[:5]}.")


def _targets(target: Optional[Union[int, Sequence[int]]], partitions: int) -> List[int]:
    if target is None:
        return list(range(partitions))
    if isinstance(target, (int, np.integer)):
        return [int(target)]
    return [int(t) for t in target]


# ---------------------------------------------------------------------------------------------- kronfluence overrides
def apply_kronfluence_overrides(req: ScoreRequest) -> ScoreArguments:
    """The same silent/warned overrides kronfluence applies after writing `score_arguments.json`."""
    args = dataclasses.replace(req.score_args)
    if req.kind == "pairwise" and args.compute_per_token_scores and args.aggregate_train_gradients:
        logger.warning(
            "Token-wise influence computation is not compatible with `aggregate_train_gradients=True`. "
            "Disabling `compute_per_token_scores`."
        )
        args.compute_per_token_scores = False
    if req.kind == "self":
        if args.aggregate_query_gradients or args.aggregate_train_gradients:
            logger.warning("Query or train gradient aggregation is not supported for self-influence computation.")
            args.aggregate_query_gradients = args.aggregate_train_gradients = False
        if args.compute_per_token_scores:
            logger.warning("Token-wise influence computation is not compatible with self-influence scores.")
            args.compute_per_token_scores = False
        if args.query_gradient_accumulation_steps != 1:
            args.query_gradient_accumulation_steps = 1
        if args.query_gradient_low_rank is not None:
            args.query_gradient_low_rank = None
    defaults = ScoreArguments()
    for name, reason in IGNORED_SCORE_FIELDS.items():
        if getattr(args, name) != getattr(defaults, name):
            warn_once(f"ignored-{name}", f"`ScoreArguments.{name}` is ignored by strategy 'bif': {reason}.")
    return args


# ---------------------------------------------------------------------------------------------- partitions
@dataclass
class PartitionPlan:
    """kronfluence's partitions for one request: data partitions of the scored rows, module partitions of units.

    Per-module scores use the paper's weight-restricted posterior (App. B.1): each module's score samples only
    that module's weights, so per-module scores do not add up to the all-modules score, and module partitions
    split the modules over jobs as kronfluence does. An all-modules BIF score does not split over modules, so with
    module partitions each (data, module) job scores a 1/module_partitions share of its data partition's examples
    and writes zeros for the rest: kronfluence's aggregation adds module partitions, so it gives the unpartitioned
    scores exactly.
    """

    rows: List[int]  # dataset indices of the scored training examples
    bounds: List[Tuple[int, int]]  # data partition p scores rows[bounds[p][0]:bounds[p][1]]
    data_targets: List[int]
    groups: List[List[str]]  # module partition j: its unit names ([[]]: no module partitions)
    module_targets: List[int]
    per_module: bool
    units: Dict[str, List[Tuple[str, nn.Parameter]]]

    @classmethod
    def build(cls, req: ScoreRequest, args: ScoreArguments, model: nn.Module, task: Any, bif_args: BIFArguments):
        rows = list(range(len(req.train_dataset))) if req.train_indices is None else [int(i) for i in req.train_indices]
        bounds = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(len(rows)), args.data_partitions)]
        units: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
        groups: List[List[str]] = [[]]
        if args.compute_per_module_scores or args.module_partitions > 1:
            names = task.get_influence_tracked_modules()
            units = dict(module_units(model, names, tracked_module_names(model), bif_args.sampled_modules))
            if len(units) < args.module_partitions:
                raise ValueError(
                    f"Module partition size ({args.module_partitions}) exceeds total tracked modules ({len(units)}). "
                    "Please reduce the module partition size."
                )
            groups = make_modules_partition(list(units), args.module_partitions)
        smallest = min(hi - lo for lo, hi in bounds)
        if not args.compute_per_module_scores and smallest < args.module_partitions:
            raise ValueError(
                f"`ScoreArguments.module_partitions={args.module_partitions}` with all-modules BIF scores splits each "
                f"data partition's training examples over the module partitions, but a data partition holds only "
                f"{smallest}. Lower `module_partitions` or `data_partitions`."
            )
        return cls(
            rows=rows,
            bounds=bounds,
            data_targets=_targets(req.target_data_partitions, args.data_partitions),
            groups=groups,
            module_targets=_targets(req.target_module_partitions, args.module_partitions),
            per_module=bool(args.compute_per_module_scores),
            units=units,
        )

    @property
    def partitioned(self) -> bool:
        return len(self.bounds) > 1 or len(self.groups) > 1

    @property
    def splits_columns(self) -> bool:
        """All-modules scores with module partitions: module partition j scores a share of each data partition."""
        return not self.per_module and len(self.groups) > 1

    def score_keys(self, module_partition: int) -> List[Tuple[str, Optional[List[Tuple[str, nn.Parameter]]]]]:
        """(score key, the weights its chains sample; None: the default selection) for one module partition."""
        if self.per_module:
            return [(name, self.units[name]) for name in self.groups[module_partition]]
        return [(storage.ALL_MODULES, None)]

    def chunk(self, data_partition: int, module_partition: int) -> Tuple[int, int]:
        """Positions in `rows` that the (data, module) partition job scores."""
        lo, hi = self.bounds[data_partition]
        if not self.splits_columns:
            return lo, hi
        part = np.array_split(np.arange(lo, hi), len(self.groups))[module_partition]
        return int(part[0]), int(part[-1]) + 1

    def columns(self, data_partitions: List[int], module_partition: int) -> List[int]:
        """Dataset indices scored by one job, data partition after data partition."""
        return [self.rows[i] for p in data_partitions for i in range(*self.chunk(p, module_partition))]

    def tag(self, kind: str, data_partitions: List[int], module_partition: int, key: str) -> str:
        """Checkpoint tag of one sampling run (unchanged for unpartitioned all-modules runs)."""
        tag = f"{kind}_" + ("partitions" + "-".join(map(str, data_partitions)) if self.partitioned else "all")
        if len(self.groups) > 1:
            tag += f"_modules{module_partition}"
        return tag if key == storage.ALL_MODULES else f"{tag}_{key}"


# ---------------------------------------------------------------------------------------------- the computation
class BIFScorer:
    """Computes and writes BIF scores for one request; owned by the Analyzer."""

    def __init__(self, model: nn.Module, task: Any, analysis_dir: Path, disable_tqdm: bool, profiler=None) -> None:
        self.model = unwrap_model(model)
        self.task = task
        self.analysis_dir = analysis_dir
        self.disable_tqdm = disable_tqdm
        self.profiler = profiler

    def run(
        self, req: ScoreRequest, factor_args: FactorArguments, bif_args: BIFArguments
    ) -> Optional[Dict[str, torch.Tensor]]:
        out = storage.scores_dir(self.analysis_dir, req.scores_name)
        final = storage.score_file(out, req.kind)
        if final.exists() and not req.overwrite_output_dir:
            logger.info("Found existing %s scores at `%s`. Skipping.", req.kind, out)
            return storage.load_tensors(final)
        validate_request(req)
        state = process_state(self.model)
        args = apply_kronfluence_overrides(req)
        plan = PartitionPlan.build(req, args, self.model, self.task, bif_args)
        state.on_main(self._prepare_folder, out, req, factor_args, bif_args)
        todo = self._todo(out, req, plan)
        state.barrier()  # nobody writes a partition before everyone has decided what to compute
        for module_partition, data_partitions in todo.items():
            if data_partitions:
                self._score(req, args, bif_args, plan, data_partitions, module_partition, state, out)
        if plan.partitioned:
            aggregated = state.on_main(lambda: aggregate_partitions(out, req.kind, args, bif_args) is not None)
            if not aggregated:
                logger.info("Scores are not aggregated as scores for some partitions are not yet computed.")
        return None

    @staticmethod
    def _todo(out: Path, req: ScoreRequest, plan: PartitionPlan) -> Dict[int, List[int]]:
        """Data partitions to compute, per module partition: kronfluence skips partition files that exist."""
        if not plan.partitioned:
            return {0: [0]}
        todo: Dict[int, List[int]] = {}
        for j in plan.module_targets:
            todo[j] = []
            for p in plan.data_targets:
                if req.overwrite_output_dir or not storage.score_file(out, req.kind, (p, j)).exists():
                    todo[j].append(p)
                else:
                    logger.info(
                        "Found existing %s scores for data partition %d and module partition %d at `%s`. Skipping.",
                        req.kind,
                        p,
                        j,
                        out,
                    )
        return todo

    def _score(self, req, args, bif_args, plan: PartitionPlan, data_partitions, module_partition, state, out) -> None:
        """Sample every score key of one module partition (one set of chains per key), then write its files."""
        start = time.time()
        columns = plan.columns(data_partitions, module_partition)
        widths = [hi - lo for lo, hi in (plan.chunk(p, module_partition) for p in data_partitions)]
        scores: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        results: Dict[str, SamplingResult] = {}
        tags = []
        for key, params in plan.score_keys(module_partition):
            tags.append(plan.tag(req.kind, data_partitions, module_partition, key))
            with self._profile(f"Sample BIF {req.kind.capitalize()} Scores"):
                result = self._sample(req, args, bif_args, columns, widths, state, out, tags[-1], params)
            # only the writer forms the score matrix; the moments are dropped once it has
            state.on_main(lambda r=result, k=key: scores.__setitem__(k, _score_matrix(r, bif_args)))
            result.moments = None
            results[key] = result
        logger.info("Sampled BIF %s scores in %.2f seconds.", req.kind, time.time() - start)
        with self._profile(f"Save BIF {req.kind.capitalize()} Scores"):
            state.on_main(
                self._write_results,
                out,
                req.kind,
                args,
                bif_args,
                scores,
                data_partitions,
                module_partition,
                plan,
                results,
            )
        if not bif_args.keep_checkpoints:
            for tag in tags:
                state.on_main(remove_checkpoints, out, tag)

    def _profile(self, name: str):
        return contextlib.nullcontext() if self.profiler is None else self.profiler.profile(name)

    def _prepare_folder(
        self, out: Path, req: ScoreRequest, factor_args: FactorArguments, bif_args: BIFArguments
    ) -> None:
        """Record (or check) the arguments; clear what an overwrite replaces and what a killed write left."""
        out.mkdir(parents=True, exist_ok=True)
        self._record_arguments(out, req, factor_args, bif_args)
        if req.overwrite_output_dir:
            remove_checkpoints(out)
        storage.remove_temporaries(out)

    def _write_results(self, out, kind, args, bif_args, scores, todo, module_partition, plan, results) -> None:
        """Diagnostics first, scores last: an existing score file always means a complete run."""
        self._write_diagnostics(out, results, bif_args)
        self._write_token_scores(out, args, bif_args, scores, plan.partitioned)
        self._write(out, kind, args, bif_args, {k: v[0] for k, v in scores.items()}, todo, module_partition, plan)

    # ------------------------------------------------------------------ arguments and metadata
    def _record_arguments(
        self, out: Path, req: ScoreRequest, factor_args: FactorArguments, bif_args: BIFArguments
    ) -> None:
        ow = req.overwrite_output_dir
        if ow:
            storage.score_file(out, req.kind).unlink(missing_ok=True)
            storage.remove_stale_partitions(out, req.kind)
            for name in (storage.BIF_TOKEN_SCORES_FILE, storage.BIF_TRACES_FILE, storage.BIF_DIAGNOSTICS_FILE):
                (out / name).unlink(missing_ok=True)
        storage.save_or_check_json(out / storage.SCORE_ARGUMENTS_FILE, req.score_args.to_dict(), "arguments", ow)
        storage.save_or_check_json(out / storage.FACTOR_ARGUMENTS_FILE, factor_args.to_dict(), "arguments", ow)
        storage.save_or_check_json(
            out / storage.BIF_ARGUMENTS_FILE, bif_args.to_dict(), "BIF arguments", ow, ignore=RUN_CONTROL_FIELDS
        )
        if req.kind == "pairwise":
            meta = storage.dataset_metadata(req.query_dataset, req.query_indices)
            storage.save_or_check_json(out / storage.DATASET_METADATA_FILES["query"], meta, "dataset metadata", ow)
        meta = storage.dataset_metadata(req.train_dataset, req.train_indices)
        storage.save_or_check_json(out / storage.DATASET_METADATA_FILES["train"], meta, "dataset metadata", ow)

    # ------------------------------------------------------------------ sampling
    def _sample(
        self,
        req: ScoreRequest,
        args: ScoreArguments,
        bif_args: BIFArguments,
        train_rows: List[int],
        widths: List[int],
        state: ProcessState,
        out: Path,
        tag: str,
        params: Optional[List[Tuple[str, nn.Parameter]]] = None,
    ) -> SamplingResult:
        """One set of chains over `params` (None: the Task's tracked modules, else every parameter)."""
        device = next(self.model.parameters()).device
        views = LossViews(self.task)
        n_train = len(req.train_dataset)
        eval_bs = req.per_device_train_batch_size or min(req.initial_per_device_train_batch_size_attempt, n_train)
        train_data = DatasetOnDevice(
            req.train_dataset, eval_bs, req.dataloader_params, device, cache=bif_args.cache_batches
        )
        stream = MinibatchStream(train_data, bif_args.sampler_batch_size)
        x_reduce = None
        if args.aggregate_train_gradients:
            x_reduce = _segment_sum(widths)  # one sum per data partition
        per_token = req.kind == "pairwise" and args.compute_per_token_scores
        x_view = views.train_tokens() if per_token else views.train
        x = Side(train_data.batches(train_rows, eval_bs), x_view, x_reduce)
        y: Optional[Side] = None
        if req.kind == "pairwise":
            # queries are forwards only, like the training examples: evaluate them in batches as large as those
            # (fewer, larger kernels per draw); per_device_query_batch_size bounds EK-FAC's query gradients
            query_bs = max(req.per_device_query_batch_size, eval_bs)
            query_data = DatasetOnDevice(
                req.query_dataset, query_bs, req.dataloader_params, device, cache=bif_args.cache_batches
            )
            y_view = views.measurement_tokens(bif_args.token_by_token) if per_token else views.measurement
            y_batches = query_data.batches(req.query_indices, query_bs)
            y = Side(y_batches, y_view)
            if args.aggregate_query_gradients:  # sum over queries, keeping each query's [1 + T] values apart
                y.reduce = lambda v, side=y: v.reshape(v.shape[0], -1, side.width).sum(1)
        elif args.use_measurement_for_self_influence:
            y = Side(train_data.batches(train_rows, eval_bs), views.measurement)
        if params is None:
            params = select_parameters(self.model, self.task.get_influence_tracked_modules(), bif_args.sampled_modules)
        logger.info(
            "Sampling %d parameter tensors (%d weights) with %s: %d chains x %d draws on %d process(es).",
            len(params),
            sum(p.numel() for _, p in params),
            bif_args.sampler,
            bif_args.num_chains,
            bif_args.num_draws,
            state.num_processes,
        )
        plan = state.plan(bif_args.num_chains)

        def store(name: str) -> Optional[CheckpointStore]:
            if bif_args.checkpoint_interval <= 0:
                return None
            content = {
                "bif": {k: v for k, v in bif_args.to_dict().items() if k not in RUN_CONTROL_FIELDS},
                "score": args.to_dict(),
                "kind": req.kind,
                "tag": name,
                "train": storage.dataset_metadata(req.train_dataset, req.train_indices),
                "query": None
                if req.query_dataset is None
                else storage.dataset_metadata(req.query_dataset, req.query_indices),
            }
            return CheckpointStore(out, name, fingerprint(content), plan.shard, plan.num_shards)

        # the health trace follows the request's scored rows, not this job's partition: the same in every job
        scored = range(n_train) if req.train_indices is None else req.train_indices
        monitor = monitor_rows(scored, bif_args.seed)
        with SampledWeights(self.model, params) as weights:

            def engine_for(x_side: Side, checkpoints: Optional[CheckpointStore]) -> SamplingEngine:
                return SamplingEngine(
                    self.model,
                    views,
                    weights,
                    stream,
                    x_side,
                    y,
                    bif_args,
                    diagonal=req.kind == "self",
                    amp_dtype=as_dtype(args.amp_dtype),
                    disable_tqdm=self.disable_tqdm,
                    state=state,
                    checkpoints=checkpoints,
                    monitor=monitor,
                )

            engine = engine_for(x, store(tag))
            engine.check_views()
            blocks = column_blocks(x, y, train_rows, bif_args.moment_memory_gb)
            if len(blocks) == 1:
                return engine.run()
            logger.info(
                "The moment sums exceed moment_memory_gb=%g: computing %d blocks of training columns, re-running the "
                "same chains for each.",
                bif_args.moment_memory_gb,
                len(blocks),
            )
            parts, merged = [], None
            for k, rows in enumerate(blocks):
                x_block = Side(train_data.batches(rows, eval_bs), x.view)
                result = engine_for(x_block, store(f"{tag}_block{k}of{len(blocks)}")).run()
                # each block's scores from its own sums: re-run chains need not be bit-identical (GPU kernels)
                parts.append(
                    (result.moments.correlation() if bif_args.normalize else result.moments.covariance()).cpu()
                )
                merged = merged or result
                result.moments = None
            merged.scores = torch.cat(parts, dim=-1)
            return merged

    # ------------------------------------------------------------------ writing
    def _write(self, out, kind, args, bif_args, scores: Dict[str, torch.Tensor], todo, module_partition, plan) -> None:
        """kronfluence's score files: one per (data, module) partition, or the single unpartitioned file."""
        dtype = as_dtype(args.score_dtype)
        metadata = header_metadata(args, bif_args)
        if not plan.partitioned:
            storage.save_tensors(storage.score_file(out, kind), {k: v.to(dtype) for k, v in scores.items()}, metadata)
            logger.info("Saved %s scores at `%s`.", kind, out)
            return
        dim = 1 if kind == "pairwise" else 0  # the train axis ([q, n], [q, n, T] or [n])
        offset = 0
        for k, p in enumerate(todo):
            lo, hi = plan.chunk(p, module_partition)
            start, size = (k, 1) if args.aggregate_train_gradients else (offset, hi - lo)
            offset += hi - lo
            part = {key: v.narrow(dim, start, size) for key, v in scores.items()}
            if plan.splits_columns and not args.aggregate_train_gradients:  # zeros where other module jobs score
                part = {
                    key: _embed(v, dim, lo - plan.bounds[p][0], plan.bounds[p][1] - plan.bounds[p][0])
                    for key, v in part.items()
                }
            part = {key: v.contiguous().to(dtype) for key, v in part.items()}
            storage.save_tensors(storage.score_file(out, kind, (p, module_partition)), part, metadata)
            logger.info(
                "Saved %s scores of data partition %d and module partition %d at `%s`.", kind, p, module_partition, out
            )

    @staticmethod
    def _write_token_scores(out: Path, args: ScoreArguments, bif_args: BIFArguments, scores, partitioned: bool):
        token = {k: v[1] for k, v in scores.items() if v[1] is not None}
        if not token:
            return
        if partitioned or list(token) != [storage.ALL_MODULES]:
            logger.info("Token-by-token scores are written for unpartitioned all-modules runs only; skipped.")
            return
        tensors = {storage.ALL_MODULES: token[storage.ALL_MODULES].contiguous().to(as_dtype(args.score_dtype))}
        storage.save_tensors(out / storage.BIF_TOKEN_SCORES_FILE, tensors, header_metadata(args, bif_args))
        logger.info("Saved token-by-token scores %s at `%s`.", tuple(tensors[storage.ALL_MODULES].shape), out)

    @staticmethod
    def _write_diagnostics(out: Path, results: Dict[str, SamplingResult], bif_args: BIFArguments) -> None:
        """Per-run diagnostics; per-module runs (one set of chains per module) tag chains, traces and warnings."""
        reports = {k: summarize(r.traces, r.chain_summaries, bif_args, r.sharpness) for k, r in results.items()}
        if list(results) == [storage.ALL_MODULES]:
            report, traces = reports[storage.ALL_MODULES], results[storage.ALL_MODULES].traces
        else:
            report = merge_module_reports(reports)
            traces = {f"{k}/{name}": t for k, r in results.items() for name, t in r.traces.items()}
        for warning in report["warnings"]:
            logger.warning("BIF sampler diagnostics (%s): %s", warning["code"], warning["message"])
        storage.save_tensors(out / storage.BIF_TRACES_FILE, traces)
        # NaN (e.g. the R-hat of flat chains) becomes null: the file stays strict JSON
        storage.save_json(jsonable(report), out / storage.BIF_DIAGNOSTICS_FILE)


def header_metadata(args: ScoreArguments, bif_args: BIFArguments) -> Dict[str, str]:
    """kronfluence's 17 ScoreArguments keys, unchanged, plus one `bif_arguments` key (JSON)."""
    metadata = args.to_str_dict()
    metadata[storage.BIF_HEADER_KEY] = json.dumps(bif_args.to_dict())
    return metadata


def _embed(values: torch.Tensor, dim: int, start: int, width: int) -> torch.Tensor:
    """`values` placed at `start` along `dim` in zeros of size `width` there."""
    shape = list(values.shape)
    shape[dim] = width
    full = torch.zeros(shape, dtype=values.dtype)
    full.narrow(dim, start, values.shape[dim]).copy_(values)
    return full


def _score_matrix(result: SamplingResult, bif_args: BIFArguments) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """kronfluence's scores and the token-by-token matrix (or None) of one sampling run."""
    if result.scores is None:
        scores = result.moments.correlation() if bif_args.normalize else result.moments.covariance()
    else:
        scores = result.scores
    return split_token_scores(scores, *result.widths)


def column_blocks(x: Side, y: Optional[Side], rows: List[int], budget_gb: float) -> List[List[int]]:
    """Split the scored training rows so each block's float64 cross sums fit in `budget_gb` (pairwise only)."""
    if y is None or x.reduce is not None:
        return [rows]
    dim_y = reduced_dim(y, y.columns)
    needed = 8.0 * dim_y * x.columns / 1e9
    count = min(len(rows), max(1, int(np.ceil(needed / budget_gb))))
    return [list(map(int, block)) for block in np.array_split(np.asarray(rows), count)]


def split_token_scores(scores: torch.Tensor, x_width: int, y_width: int):
    """[q * y_width, n * x_width] -> kronfluence's scores ([q, n] or [q, n, T]) and token-by-token [q, Tq, n, T]."""
    if x_width == 1 and y_width == 1:
        return scores, None
    blocks = scores.reshape(-1, y_width, scores.shape[-1] // x_width, x_width)
    token = blocks[:, 1:] if y_width > 1 else None
    return blocks[:, 0], token


def _segment_sum(widths: List[int]):
    ids = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))

    def reduce(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(values.shape[0], len(widths), dtype=values.dtype, device=values.device)
        return out.index_add_(1, ids.to(values.device), values)

    return reduce


def aggregate_partitions(
    out: Path, kind: str, args: ScoreArguments, bif_args: BIFArguments
) -> Optional[Dict[str, torch.Tensor]]:
    """kronfluence's aggregation: add each key over module partitions, then concatenate data partitions (or add
    them, for aggregated train gradients)."""
    files = [
        [storage.score_file(out, kind, (p, j)) for j in range(args.module_partitions)]
        for p in range(args.data_partitions)
    ]
    if not all(f.exists() for row in files for f in row):
        return None
    merged: Dict[str, torch.Tensor] = {}
    for row in files:
        part: Dict[str, torch.Tensor] = {}
        for f in row:
            for key, value in storage.load_tensors(f).items():
                part[key] = part[key] + value if key in part else value
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif args.aggregate_train_gradients:
                merged[key] = merged[key] + value
            else:
                merged[key] = torch.cat((merged[key], value), dim=1 if kind == "pairwise" else 0)
    storage.save_tensors(storage.score_file(out, kind), merged, header_metadata(args, bif_args))
    logger.info("Saved aggregated %s scores at `%s`.", kind, out)
    return merged
