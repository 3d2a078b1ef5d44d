"""BIF pairwise and self scores: request -> partition plan -> per job: problem -> engine -> kronfluence's files.

`requests.py` validates the request and plans its partitions, `problem.py` wires the data and weights of each job,
the engine samples, and `storage.ScoreWriter` writes kronfluence's files. This module runs those steps in order,
records the arguments, and writes BIF's diagnostics beside the scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn

from kronfluence_bif import storage
from kronfluence_bif.arguments import RUN_CONTROL_FIELDS, BIFArguments
from kronfluence_bif.checkpoints import CheckpointStore, fingerprint, remove_checkpoints
from kronfluence_bif.diagnostics import merge_module_reports, summarize
from kronfluence_bif.distributed import ProcessState, process_state, unwrap_model
from kronfluence_bif.engine import SamplingResult, Side, reduced_dim
from kronfluence_bif.logs import logger
from kronfluence_bif.parameters import SampledWeights
from kronfluence_bif.problem import Problem, resolve_arguments, score_problem
from kronfluence_bif.requests import (  # noqa: F401 - re-exported: the request API's historical home
    IGNORED_SCORE_FIELDS,
    PartitionPlan,
    ScoreRequest,
    apply_kronfluence_overrides,
    as_dtype,
    validate_request,
)
from kronfluence_bif.storage import ScoreKind, ScoreWriter, header_metadata

Matrices = Tuple[torch.Tensor, Optional[torch.Tensor]]  # kronfluence's scores and the token-by-token scores (or None)


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
            writer = self._writer(out, req.kind, args, bif_args)
            aggregated = state.on_main(
                lambda: (
                    writer.aggregate(args.data_partitions, args.module_partitions, args.aggregate_train_gradients)
                    is not None
                )
            )
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
        """Sample every score key of one module partition (one set of chains per key), then write its files. The
        files record the user's `bif_args`; the diagnostics also the resolved ones the chains ran with."""
        start = time.time()
        run_args = resolve_arguments(self.model, self.task, bif_args, *_evaluated(req))  # what the chains run
        columns = plan.columns(data_partitions, module_partition)
        widths = [hi - lo for lo, hi in (plan.chunk(p, module_partition) for p in data_partitions)]
        scores: Dict[str, Matrices] = {}
        results: Dict[str, SamplingResult] = {}
        tags = []
        # the job's data and sides once (collating a dataset onto the device is a fixed cost); per key its weights
        job = score_problem(self.model, self.task, req, args, run_args, columns, widths)
        for key, params in plan.score_keys(module_partition):
            tags.append(plan.tag(req.kind, data_partitions, module_partition, key))
            problem = job if params is None else dataclasses.replace(job, params=params)
            checkpoints = self._checkpoints(req, args, run_args, out, tags[-1], state)
            with self._profile(f"Sample BIF {req.kind.label} Scores"):
                result, blocks = self._sample(problem, run_args, columns, state, checkpoints, tags[-1], out, req, args)
            # only the writer forms the score matrix; the moments are dropped once it has
            state.on_main(lambda r=result, b=blocks, k=key: scores.__setitem__(k, _score_matrix(r, b, bif_args)))
            result.moments = None
            results[key] = result
        logger.info("Sampled BIF %s scores in %.2f seconds.", req.kind, time.time() - start)
        with self._profile(f"Save BIF {req.kind.label} Scores"):
            # diagnostics first, scores last: an existing score file always means a complete run
            ran = next((r.args for r in results.values() if r.args is not None), run_args)  # the pilot's choice
            state.on_main(self._write_diagnostics, out, results, ran)
            state.on_main(
                self._write_results, out, req.kind, args, bif_args, scores, data_partitions, module_partition, plan
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

    # ------------------------------------------------------------------ arguments and metadata
    @staticmethod
    def _record_arguments(out: Path, req: ScoreRequest, factor_args: FactorArguments, bif_args: BIFArguments) -> None:
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
        if req.kind is ScoreKind.PAIRWISE:
            meta = storage.dataset_metadata(req.query_dataset, req.query_indices)
            storage.save_or_check_json(out / storage.DATASET_METADATA_FILES["query"], meta, "dataset metadata", ow)
        meta = storage.dataset_metadata(req.train_dataset, req.train_indices)
        storage.save_or_check_json(out / storage.DATASET_METADATA_FILES["train"], meta, "dataset metadata", ow)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _checkpoints(req, args: ScoreArguments, bif_args: BIFArguments, out: Path, tag: str, state: ProcessState):
        """The per-chain checkpoint store of one sampling run (None when checkpoints are off); its fingerprint is
        everything that determines the chains' values."""
        if bif_args.checkpoint_interval <= 0:
            return None
        content = {
            "bif": {k: v for k, v in bif_args.to_dict().items() if k not in RUN_CONTROL_FIELDS},
            "score": args.to_dict(),
            "kind": str(req.kind),
            "tag": tag,
            "train": storage.dataset_metadata(req.train_dataset, req.train_indices),
            "query": None
            if req.query_dataset is None
            else storage.dataset_metadata(req.query_dataset, req.query_indices),
        }
        plan = state.plan(bif_args.num_chains)
        return CheckpointStore(out, tag, fingerprint(content), plan.shard, plan.num_shards)

    def _sample(
        self, problem: Problem, bif_args: BIFArguments, rows: List[int], state, checkpoints, tag, out, req, args
    ) -> Tuple[SamplingResult, Optional[torch.Tensor]]:
        """One set of chains over the problem's weights. Returns the result and, when the moment sums did not fit
        in `moment_memory_gb` (one run per block of training columns), the blocks' scores already pooled."""
        logger.info(
            "Sampling %d parameter tensors (%d weights) with %s: %d chains x %d draws on %d process(es).",
            len(problem.params),
            problem.num_weights,
            bif_args.sampler,
            bif_args.num_chains,
            bif_args.num_draws,
            state.num_processes,
        )
        settings = dict(disable_tqdm=self.disable_tqdm, state=state)
        with SampledWeights(self.model, problem.params) as weights:
            engine = problem.engine(self.model, weights, bif_args, checkpoints=checkpoints, **settings)
            engine.check_views()
            blocks = column_blocks(problem.x, problem.y, rows, bif_args.moment_memory_gb)
            if len(blocks) == 1:
                return engine.run(), None
            logger.info(
                "The moment sums exceed moment_memory_gb=%g: computing %d blocks of training columns, re-running the "
                "same chains for each.",
                bif_args.moment_memory_gb,
                len(blocks),
            )
            parts, first, block_args = [], None, bif_args
            for k, block in enumerate(blocks):
                store = self._checkpoints(req, args, bif_args, out, f"{tag}_block{k}of{len(blocks)}", state)
                result = problem.engine(
                    self.model, weights, block_args, problem.x_block(block), checkpoints=store, **settings
                ).run()
                # the same chains for every block: the first block's temperature, piloted once
                block_args = dataclasses.replace(result.args, calibrate_temperature=False)
                # each block's scores from its own sums: re-run chains need not be bit-identical (GPU kernels)
                parts.append(_moment_scores(result, bif_args).cpu())
                first = first or result
                result.moments = None
            return first, torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _writer(out: Path, kind: ScoreKind, args: ScoreArguments, bif_args: BIFArguments) -> ScoreWriter:
        return ScoreWriter(out, kind, header_metadata(args, bif_args), as_dtype(args.score_dtype))

    def _write_results(self, out, kind, args, bif_args, scores: Dict[str, Matrices], todo, module_partition, plan):
        """Token-by-token scores first, kronfluence's scores last."""
        writer = self._writer(out, kind, args, bif_args)
        token = {k: v[1] for k, v in scores.items() if v[1] is not None}
        if token and (plan.partitioned or list(token) != [storage.ALL_MODULES]):
            logger.info("Token-by-token scores are written for unpartitioned all-modules runs only; skipped.")
        elif token:
            writer.save_token_scores(token[storage.ALL_MODULES])
        matrices = {k: v[0] for k, v in scores.items()}
        if not plan.partitioned:
            writer.save(matrices)
            return
        for partition, part in plan.job_files(kind, matrices, todo, module_partition, args.aggregate_train_gradients):
            writer.save(part, partition)

    @staticmethod
    def _write_diagnostics(out: Path, results: Dict[str, SamplingResult], bif_args: BIFArguments) -> None:
        """Per-run diagnostics; per-module runs (one set of chains per module) tag chains, traces and warnings."""
        reports = {
            k: summarize(r.traces, r.chain_summaries, bif_args, r.sharpness, r.linear_term, r.rounded_values)
            for k, r in results.items()
        }
        if list(results) == [storage.ALL_MODULES]:
            report, traces = reports[storage.ALL_MODULES], results[storage.ALL_MODULES].traces
        else:
            report = merge_module_reports(reports)
            traces = {f"{k}/{name}": t for k, r in results.items() for name, t in r.traces.items()}
        for warning in report["warnings"]:
            logger.warning("BIF sampler diagnostics (%s): %s", warning["code"], warning["message"])
        storage.save_tensors(out / storage.BIF_TRACES_FILE, traces)
        report["sampler_arguments"] = {  # what the run sampled with ("auto" and None fields resolved)
            k: v for k, v in bif_args.to_dict().items() if k not in RUN_CONTROL_FIELDS
        }
        # NaN (e.g. the R-hat of flat chains) becomes null: the file stays strict JSON
        storage.save_json(storage.jsonable(report), out / storage.BIF_DIAGNOSTICS_FILE)


def _evaluated(req: ScoreRequest) -> Tuple[int, int]:
    """(training examples in the posterior, examples every draw evaluates: the scored train rows and the queries)."""
    n = len(req.train_dataset)
    scored = n if req.train_indices is None else len(req.train_indices)
    if req.query_dataset is None:
        return n, scored
    return n, scored + (len(req.query_dataset) if req.query_indices is None else len(req.query_indices))


def _moment_scores(result: SamplingResult, bif_args: BIFArguments) -> torch.Tensor:
    return result.moments.correlation() if bif_args.normalize else result.moments.covariance()


def _score_matrix(result: SamplingResult, blocks: Optional[torch.Tensor], bif_args: BIFArguments) -> Matrices:
    """kronfluence's scores and the token-by-token matrix (or None) of one sampling run."""
    scores = _moment_scores(result, bif_args) if blocks is None else blocks
    return split_token_scores(scores, *result.widths)


def column_blocks(x: Side, y: Optional[Side], rows: List[int], budget_gb: float) -> List[List[int]]:
    """Split the scored training rows so each block's float64 cross sums fit in `budget_gb` (pairwise only)."""
    if y is None or x.reduce is not None:
        return [rows]
    dim_y = reduced_dim(y, y.columns)
    needed = 8.0 * dim_y * x.columns / 1e9
    count = min(len(rows), max(1, int(np.ceil(needed / budget_gb))))
    return [list(map(int, block)) for block in np.array_split(np.asarray(rows), count)]


def split_token_scores(scores: torch.Tensor, x_width: int, y_width: int) -> Matrices:
    """[q * y_width, n * x_width] -> kronfluence's scores ([q, n] or [q, n, T]) and token-by-token [q, Tq, n, T]."""
    if x_width == 1 and y_width == 1:
        return scores, None
    blocks = scores.reshape(-1, y_width, scores.shape[-1] // x_width, x_width)
    token = blocks[:, 1:] if y_width > 1 else None
    return blocks[:, 0], token
