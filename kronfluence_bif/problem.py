"""What one set of chains samples and evaluates: a request's data, views, sides and sampled weights.

Scoring (`score_problem`) and calibration (`calibration_problem`) build their sampling problems here, so the
datasets, the SGLD minibatch stream, the two sides of the covariance and the sampled parameters are wired one
way only; `Problem.engine` then makes the engine that runs the chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from kronfluence.arguments import ScoreArguments
from torch import nn
from torch.utils import data

from kronfluence_bif.arguments import AUTO_SAMPLER, BIFArguments
from kronfluence_bif.data import DatasetOnDevice, MinibatchStream
from kronfluence_bif.engine import SamplingEngine, Side, monitor_rows
from kronfluence_bif.logs import logger
from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.parameters import SampledWeights, select_parameters
from kronfluence_bif.requests import ScoreKind, ScoreRequest, as_dtype


@dataclass
class Problem:
    """One BIF computation's inputs: x (scored training examples) against y (queries; None: x itself)."""

    views: LossViews
    train_data: DatasetOnDevice  # the whole training set, which the SGLD minibatches come from
    stream: MinibatchStream
    x: Side
    y: Optional[Side]
    params: List[Tuple[str, nn.Parameter]]  # the sampled weights
    monitor: List[int]  # training rows whose mean loss is each chain's health trace
    diagonal: bool  # self scores: example i paired with itself only
    eval_batch_size: int
    amp_dtype: Optional[torch.dtype] = None

    @property
    def num_weights(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def x_block(self, rows: List[int]) -> Side:
        """The x side restricted to the training rows `rows` (a block of the moment columns)."""
        return Side(self.train_data.batches(rows, self.eval_batch_size), self.x.view)

    def engine(
        self, model: nn.Module, weights: SampledWeights, bif_args: BIFArguments, x: Optional[Side] = None, **kw: Any
    ) -> SamplingEngine:
        """The engine for this problem (`x` replaces the scored side, for column blocks); `kw`: the engine's run
        settings (disable_tqdm, state, checkpoints)."""
        return SamplingEngine(
            model,
            self.views,
            weights,
            self.stream,
            self.x if x is None else x,
            self.y,
            bif_args,
            diagonal=self.diagonal,
            amp_dtype=self.amp_dtype,
            monitor=self.monitor,
            **kw,
        )


def resolve_arguments(
    model: nn.Module, task: Any, bif_args: BIFArguments, num_train: int, num_evaluated: int
) -> BIFArguments:
    """`bif_args` with sampler="auto" resolved for this model's sampled weights, a posterior over `num_train`
    examples and draws that evaluate `num_evaluated` (logged)."""
    if bif_args.sampler != AUTO_SAMPLER:
        return bif_args
    params = select_parameters(model, task.get_influence_tracked_modules(), bif_args.sampled_modules)
    num_weights = sum(p.numel() for _, p in params)
    resolved = bif_args.resolved(num_weights, num_train, num_evaluated)
    logger.info(
        "sampler='auto': %s for %d sampled weights and %d training examples, %d evaluated per draw (nbeta %g, "
        "localization %g, step_size %g, sampler_batch_size %s, %d burn-in steps%s).",
        resolved.sampler,
        num_weights,
        num_train,
        num_evaluated,
        resolved.nbeta,
        resolved.localization,
        resolved.step_size,
        "full batch"
        if resolved.sampler_batch_size is None
        else f"{resolved.sampler_batch_size}{' with the control variate' if resolved.control_variate else ''}",
        resolved.num_burnin_steps,
        ", centred at w*" if resolved.center_gradient else "",
    )
    return resolved


def score_problem(
    model: nn.Module,
    task: Any,
    req: ScoreRequest,
    args: ScoreArguments,
    bif_args: BIFArguments,
    train_rows: List[int],
    widths: List[int],
    params: Optional[List[Tuple[str, nn.Parameter]]] = None,
) -> Problem:
    """The problem of one score job: `train_rows` are the dataset indices it scores, `widths` the sizes of its data
    partitions (one sum each for aggregated train gradients), `params` its weights (None: the Task's tracked modules,
    else every parameter)."""
    device = next(model.parameters()).device
    views = LossViews(task)
    eval_bs = req.per_device_train_batch_size or min(
        req.initial_per_device_train_batch_size_attempt, len(req.train_dataset)
    )
    train_data = DatasetOnDevice(
        req.train_dataset, eval_bs, req.dataloader_params, device, cache=bif_args.cache_batches
    )
    per_token = req.kind is ScoreKind.PAIRWISE and args.compute_per_token_scores
    x = Side(
        train_data.batches(train_rows, eval_bs),
        views.train_tokens() if per_token else views.train,
        segment_sum(widths) if args.aggregate_train_gradients else None,
    )
    y: Optional[Side] = None
    if req.kind is ScoreKind.PAIRWISE:
        y = _query_side(req, args, bif_args, views, device, eval_bs, per_token)
    elif args.use_measurement_for_self_influence:
        y = Side(train_data.batches(train_rows, eval_bs), views.measurement)
    if params is None:
        params = select_parameters(model, task.get_influence_tracked_modules(), bif_args.sampled_modules)
    # the health trace follows the request's scored rows, not this job's partition: the same in every job
    scored = range(len(req.train_dataset)) if req.train_indices is None else req.train_indices
    return Problem(
        views=views,
        train_data=train_data,
        stream=MinibatchStream(train_data, bif_args.sampler_batch_size),
        x=x,
        y=y,
        params=params,
        monitor=monitor_rows(scored, bif_args.seed),
        diagonal=req.kind is ScoreKind.SELF,
        eval_batch_size=eval_bs,
        amp_dtype=as_dtype(args.amp_dtype),
    )


def _query_side(
    req: ScoreRequest, args: ScoreArguments, bif_args, views, device, eval_bs: int, per_token: bool
) -> Side:
    """The query measurements. Queries are forwards only, like the training examples: evaluated in batches as large
    as those (fewer, larger kernels per draw); per_device_query_batch_size bounds EK-FAC's query gradients."""
    query_bs = max(req.per_device_query_batch_size, eval_bs)
    query_data = DatasetOnDevice(
        req.query_dataset, query_bs, req.dataloader_params, device, cache=bif_args.cache_batches
    )
    view = views.measurement_tokens(bif_args.token_by_token) if per_token else views.measurement
    y = Side(query_data.batches(req.query_indices, query_bs), view)
    if args.aggregate_query_gradients:  # sum over queries, keeping each query's [1 + T] values apart
        y.reduce = lambda v, side=y: v.reshape(v.shape[0], -1, side.width).sum(1)
    return y


def calibration_problem(
    model: nn.Module,
    task: Any,
    train_dataset: data.Dataset,
    base: BIFArguments,
    max_examples: int,
    batch_size: int,
    loader_params: Dict[str, Any],
) -> Problem:
    """Self-influence chains on up to `max_examples` evenly spaced training examples (the calibration grid's
    problem; each chain's health trace is the mean loss of exactly those examples)."""
    device = next(model.parameters()).device
    views = LossViews(task)
    source = DatasetOnDevice(train_dataset, batch_size, loader_params, device, cache=base.cache_batches)
    rows = np.unique(np.linspace(0, len(train_dataset) - 1, min(max_examples, len(train_dataset))).astype(int)).tolist()
    return Problem(
        views=views,
        train_data=source,
        stream=MinibatchStream(source, base.sampler_batch_size),
        x=Side(source.batches(rows, batch_size), views.train),
        y=None,
        params=select_parameters(model, task.get_influence_tracked_modules(), base.sampled_modules),
        monitor=rows,
        diagonal=True,
        eval_batch_size=batch_size,
    )


def segment_sum(widths: Sequence[int]):
    """values [k, sum(widths)] -> [k, len(widths)]: one sum per consecutive segment (a data partition)."""
    ids = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths)))

    def reduce(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(values.shape[0], len(widths), dtype=values.dtype, device=values.device)
        return out.index_add_(1, ids.to(values.device), values)

    return reduce
