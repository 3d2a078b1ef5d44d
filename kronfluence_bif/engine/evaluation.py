"""Evaluation of one draw: the per-example values of both sides of the covariance into one buffer row.

Per draw the engine evaluates the per-example values x (train losses of the scored examples) and y (query
measurements, or the same examples' measurements for self scores) into one row `[n_x + n_y + n_m]`. The chain's
health trace `mean_train_loss` is the mean loss of the monitor rows, a fixed sample of the request's scored rows:
taken from x when this job scores them all, evaluated apart (the last n_m columns; a data-partition job)
otherwise, so every job of a request reports the same diagnostics. In an evaluation group each member evaluates
its own batches (`_Layout.mine`) and accumulates its own output columns (`_Layout.own`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from kronfluence_bif.compiled import maybe_compiled
from kronfluence_bif.data import EvalBatches, MinibatchStream
from kronfluence_bif.distributed import WorkPlan, split_evenly
from kronfluence_bif.engine.seeds import chain_seed
from kronfluence_bif.logs import logger
from kronfluence_bif.loss_views import PerExampleView

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

    @property
    def width(self) -> int:
        """Values in one buffer row."""
        return self.n_x + self.n_y + self.n_m


def reduced_dim(side: Side, n_raw: int) -> int:
    """Columns of a side after its reduction (aggregated gradients), for `n_raw` raw values."""
    if side.reduce is None:
        return n_raw
    return int(side.reduce(torch.zeros(1, n_raw)).shape[1])


class Evaluator:
    """Evaluates the sides (and the monitor rows) at the model's current weights, and reads blocks of rows back.

    `monitor_index`: x's columns holding the monitor rows when this job scores them all; else `monitor` is the
    Side that evaluates them apart (with x's own view, so the values are computed exactly as in a job that
    scores them).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Side,
        y: Optional[Side],
        monitor_index: Optional[torch.Tensor],
        monitor: Optional[Side],
        amp_dtype: Optional[torch.dtype],
        device: torch.device,
        compile_views: bool = False,
    ) -> None:
        self.model = model
        self.x, self.y = x, y  # y None: self-influence Var(x), y = x
        self.monitor_index = monitor_index
        self.monitor = monitor
        self.amp_dtype = amp_dtype
        self.device = device
        # what `evaluate` calls per side (and for the monitor rows): the views, compiled when asked
        labels = ["train", "query"]
        self._views = [maybe_compiled(side.view, label, compile_views) for side, label in zip(self.sides, labels)]
        self._monitor_view = None if monitor is None else maybe_compiled(monitor.view, "monitor", compile_views)
        self._fusable = True  # False once x's forwards failed to give a gradient (`_safe_train_gradient`)

    @property
    def sides(self) -> List[Side]:
        return [self.x] if self.y is None else [self.x, self.y]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def evaluate(
        self, row: torch.Tensor, mine: Optional[set], gradient: Optional[Sequence[torch.Tensor]] = None
    ) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per-example values of both sides (only this process's batches when sharded), then of the monitor rows
        (every process), into `row` [n_x + n_y + n_m]. With `gradient` (the sampled weights; only where
        `fuses_gradient`), x's forwards also give the summed train loss and its gradient with respect to them, one
        backward per batch: the next full-batch step's, without a forward of its own."""
        offset, fused = 0, None
        if gradient is not None and self._fusable:
            fused = self._safe_train_gradient(row, list(gradient))
            offset = 0 if fused is None else self.x.columns
        with torch.inference_mode(), self._autocast():
            for s, side in enumerate(self.sides):
                if fused is not None and s == 0:
                    continue
                for b, batch in enumerate(side.batches):
                    size = min(side.batches.batch_size, side.size - b * side.batches.batch_size) * side.width
                    if mine is None or (s, b) in mine:
                        values = self._views[s](batch, self.model)
                        row[offset : offset + size] = values.reshape(-1)
                    offset += size
            if self.monitor is not None:
                for batch in self.monitor.batches:
                    values = self._monitor_view(batch, self.model).reshape(-1)
                    row[offset : offset + values.numel()] = values
                    offset += values.numel()
        return fused

    def _safe_train_gradient(
        self, row: torch.Tensor, params: List[torch.Tensor]
    ) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """`_train_gradient`, or None (logged, and never tried again) where the view does not differentiate: e.g. a
        per-example view derived by vmap through a model that recomputes activations (torch.utils.checkpoint)."""
        try:
            return self._train_gradient(row, params)
        except Exception as exc:  # noqa: BLE001 - the separate forward and backward of every other run remain
            self._fusable = False
            logger.info(
                "The draws' train forwards do not give the step's gradient here (%s: %s); each step runs its own.",
                type(exc).__name__,
                str(exc).splitlines()[0][:160] if str(exc) else "",
            )
            return None

    def _train_gradient(self, row: torch.Tensor, params: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x's values into `row`, and (their sum, its gradient w.r.t. `params`), accumulated a batch at a time."""
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        grads: Optional[List[torch.Tensor]] = None
        offset = 0
        with torch.enable_grad():
            for batch in self.x.batches:
                values = self.x.view(batch, self.model)
                part = torch.autograd.grad(values.sum(), params)
                grads = list(part) if grads is None else torch._foreach_add(grads, part)
                flat = values.detach().reshape(-1)
                row[offset : offset + flat.numel()] = flat
                loss += flat.sum()
                offset += flat.numel()
        return loss, grads

    def fuses_gradient(self, stream: MinibatchStream, mine: Optional[set]) -> bool:
        """Whether x's forwards can give the step's gradient: a full-batch stream whose examples are exactly x's
        (all of them, from the same cached source), one value per example, in full precision, all evaluated here
        (no evaluation group), with the views eager (a compiled view runs under inference mode only)."""
        batches = self.x.batches
        return (
            stream.batch_size >= stream.n
            and batches.source is stream.source
            and batches.size == stream.n
            and (batches.indices is None or list(batches.indices) == list(range(stream.n)))
            and self.x.width == 1
            and self.amp_dtype is None
            and mine is None
            and self._views[0] is self.x.view
            and getattr(self.x.view, "mode", None) in ("method", "vmap")  # not a Python loop over examples
        )

    def check_views(self, diagonal: bool) -> None:
        """The per-example contract on the first batch of each side, at w*, in full precision."""
        names = ["train_dataset", "train_dataset" if diagonal else "query_dataset"]
        with torch.inference_mode():
            for side, name in zip(self.sides, names):
                side.view.check(side.batches.first(), self.model, dataset=name)

    def layout(self, plan: WorkPlan) -> _Layout:
        """The row's columns, and (in an evaluation group) which batches and output columns are this process's."""
        n_x = self.x.columns
        n_y = self.y.columns if self.y is not None else 0
        n_m = self.monitor.columns if self.monitor is not None else 0
        dim_x = reduced_dim(self.x, n_x)
        dim_y = dim_x if self.y is None else reduced_dim(self.y, n_y)
        if plan.num_shards == 1:
            return _Layout(n_x, n_y, n_m, dim_x, dim_y, None, [], None)
        units, columns, offset = [], [], 0
        for s, side in enumerate(self.sides):
            for b, size in enumerate(side.batch_sizes()):
                units.append((s, b))
                columns.append(torch.arange(offset, offset + size * side.width))
                offset += size * side.width
        parts = split_evenly([c.numel() for c in columns], plan.num_shards)
        gather = [torch.cat([columns[u] for u in part]) if part else torch.empty(0, dtype=torch.long) for part in parts]
        own = torch.tensor(np.array_split(np.arange(dim_x), plan.num_shards)[plan.shard], dtype=torch.long)
        mine = {units[u] for u in parts[plan.shard]}
        return _Layout(n_x, n_y, n_m, dim_x, dim_y, mine, gather, own.to(self.device))

    # ------------------------------------------------------------------ reading a block of rows
    def monitor_mean(self, block: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """Mean loss of the monitor rows (per-token values summed per example) for each draw of a
        [k, n_x + n_y + n_m] block: the chain's health trace."""
        k, width = block.shape[0], self.x.width
        if self.monitor_index is not None:
            values = block[:, : lay.n_x].reshape(k, -1, width)[:, self.monitor_index]
        else:
            values = block[:, lay.n_x + lay.n_y :].reshape(k, -1, width)
        return values.double().sum(-1).mean(1)

    def mean_measurement(self, block: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """The `mean_measurement` trace: mean over queries of the (sequence) measurement (column 0 of each
        query's [1 + T] values); for self scores, the mean over the scored train examples of their value."""
        if not lay.n_y:
            return block[:, : lay.n_x].double().sum(1) / max(self.x.size, 1)
        values = block[:, lay.n_x : lay.n_x + lay.n_y].double()
        if self.y.width > 1:
            values = values.view(values.shape[0], self.y.size, self.y.width)[..., 0]
        return values.mean(1)

    def centered(
        self, block: torch.Tensor, shift: torch.Tensor, lay: _Layout, diagonal: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of a block: shifted by the values at w*, reduced, restricted to this process's own columns."""
        x = block[:, : lay.n_x].double() - shift[: lay.n_x]
        if self.x.reduce is not None:
            x = self.x.reduce(x)
        if self.y is None:
            y = x
        else:
            y = block[:, lay.n_x : lay.n_x + lay.n_y].double() - shift[lay.n_x : lay.n_x + lay.n_y]
            if self.y.reduce is not None:
                y = self.y.reduce(y)
        if lay.own is not None:
            x = x[:, lay.own]
            y = y[:, lay.own] if diagonal else y
        return x, y
