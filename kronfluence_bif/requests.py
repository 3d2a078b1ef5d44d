"""What a score call asked for: the normalized request, its validation, kronfluence's overrides, its partition plan.

`ScoreRequest` holds everything `compute_pairwise_scores` / `compute_self_scores` received; `validate_request` raises
before anything is written; `apply_kronfluence_overrides` applies the overrides kronfluence applies; `PartitionPlan`
says which (data, module) partition jobs score which training rows with which weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from kronfluence.arguments import ScoreArguments
from kronfluence.module.utils import make_modules_partition
from torch import nn
from torch.utils import data

from kronfluence_bif import storage
from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.logs import logger, warn_once
from kronfluence_bif.parameters import module_units
from kronfluence_bif.storage import ScoreKind
from kronfluence_bif.tracking import tracked_module_names

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

    kind: ScoreKind
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

    def __post_init__(self) -> None:
        self.kind = ScoreKind(self.kind)


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
        if dataset is None and name == "query_dataset" and req.kind is ScoreKind.SELF:
            continue
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"`{name}` must be a map-style torch Dataset with __len__ and __getitem__.")
        if len(dataset) == 0:
            raise ValueError(f"`{name}` is empty; BIF needs at least one example in it.")
    _check_batch_size("per_device_train_batch_size", req.per_device_train_batch_size, optional=True)
    _check_batch_size(
        "initial_per_device_train_batch_size_attempt", req.initial_per_device_train_batch_size_attempt, optional=False
    )
    if req.kind is ScoreKind.PAIRWISE:
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
    if req.kind is ScoreKind.PAIRWISE and args.compute_per_token_scores and args.aggregate_train_gradients:
        logger.warning(
            "Token-wise influence computation is not compatible with `aggregate_train_gradients=True`. "
            "Disabling `compute_per_token_scores`."
        )
        args.compute_per_token_scores = False
    if req.kind is ScoreKind.SELF:
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

    def job_files(
        self,
        kind: ScoreKind,
        scores: Dict[str, torch.Tensor],
        data_partitions: List[int],
        module_partition: int,
        aggregated: bool,
    ) -> List[Tuple[Tuple[int, int], Dict[str, torch.Tensor]]]:
        """One job's scores cut into kronfluence's (data, module) partition files: the slice of each data
        partition along the train axis, placed in zeros where other module jobs score (all-modules scores with
        module partitions). `aggregated`: the scores hold one column per data partition (aggregated train
        gradients)."""
        dim = 1 if kind is ScoreKind.PAIRWISE else 0  # the train axis ([q, n], [q, n, T] or [n])
        files, offset = [], 0
        for k, p in enumerate(data_partitions):
            lo, hi = self.chunk(p, module_partition)
            start, size = (k, 1) if aggregated else (offset, hi - lo)
            offset += hi - lo
            part = {key: v.narrow(dim, start, size) for key, v in scores.items()}
            if self.splits_columns and not aggregated:
                first, last = self.bounds[p]
                part = {key: _embed(v, dim, lo - first, last - first) for key, v in part.items()}
            files.append(((p, module_partition), part))
        return files

    def tag(self, kind: str, data_partitions: List[int], module_partition: int, key: str) -> str:
        """Checkpoint tag of one sampling run (unchanged for unpartitioned all-modules runs)."""
        tag = f"{kind}_" + ("partitions" + "-".join(map(str, data_partitions)) if self.partitioned else "all")
        if len(self.groups) > 1:
            tag += f"_modules{module_partition}"
        return tag if key == storage.ALL_MODULES else f"{tag}_{key}"


def _embed(values: torch.Tensor, dim: int, start: int, width: int) -> torch.Tensor:
    """`values` placed at `start` along `dim` in zeros of size `width` there."""
    shape = list(values.shape)
    shape[dim] = width
    full = torch.zeros(shape, dtype=values.dtype)
    full.narrow(dim, start, values.shape[dim]).copy_(values)
    return full
