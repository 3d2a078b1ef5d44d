"""Process state for multi-process sampling: the one place that knows ranks, groups and collectives.

Built on Accelerate's `PartialState` (so `torchrun` and `accelerate launch` both work: gloo on CPU, nccl on
GPUs, and an already initialised process group, e.g. kronfluence's, is reused). In one process every
collective is a no-op, so the rest of the package never branches on the launch mode.

Work split (`plan_work`): chains go round-robin over processes. With more processes than chains, processes
form groups (one group per chain subset) and the members of a group shard the evaluation of the examples
batch by batch, exchanging their values once per block of draws.
"""

from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class WorkPlan:
    """What one process does: which chains it simulates, and its evaluation shard within its group."""

    chains: List[int]
    group_ranks: List[int]  # processes that simulate the same chains (they shard the evaluation)
    shard: int  # this process's index in `group_ranks`
    num_groups: int

    @property
    def num_shards(self) -> int:
        return len(self.group_ranks)

    @property
    def group(self) -> int:
        """This process's group, 0 .. num_groups - 1 (its lowest rank: groups are ranks g, g + G, ...)."""
        return self.group_ranks[0]

    @property
    def is_group_leader(self) -> bool:
        """The member that reports the group's chains (counts, traces, summaries) exactly once."""
        return self.shard == 0


def plan_work(num_chains: int, num_processes: int, rank: int) -> WorkPlan:
    """Chains round-robin over groups; the number of groups is the largest divisor of P that is <= C."""
    groups = max(g for g in range(1, min(num_chains, num_processes) + 1) if num_processes % g == 0)
    group = rank % groups
    return WorkPlan(
        chains=list(range(group, num_chains, groups)),
        group_ranks=list(range(group, num_processes, groups)),
        shard=rank // groups,
        num_groups=groups,
    )


def split_evenly(sizes: Sequence[int], parts: int) -> List[List[int]]:
    """Contiguous runs of unit indices, one per part, with about the same total size in each."""
    total = sum(sizes)
    out: List[List[int]] = [[] for _ in range(parts)]
    done = 0
    for i, size in enumerate(sizes):
        # a unit goes to the part where its midpoint falls, so parts get contiguous, balanced runs
        part = min(parts - 1, int((done + size / 2) * parts / max(total, 1)))
        out[part].append(i)
        done += size
    return out


class ProcessState:
    """Rank, world size and the few collectives BIF needs; all no-ops in a single process."""

    def __init__(self, cpu: bool, launched: bool = True) -> None:
        if launched:
            from accelerate import PartialState

            created = not (dist.is_available() and dist.is_initialized())
            state = PartialState(cpu=cpu)
            if created and dist.is_initialized():
                # a group we started is ours to close: gloo's worker threads left alive at interpreter shutdown
                # abort the process ("terminate called without an active exception") after a successful run
                atexit.register(_destroy_process_group)
            self.num_processes, self.process_index = int(state.num_processes), int(state.process_index)
        else:
            self.num_processes, self.process_index = 1, 0
        self.is_main_process = self.process_index == 0
        self._groups: dict = {}
        backend = dist.get_backend() if self.distributed else None
        self.collective_device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

    @classmethod
    def local(cls) -> ProcessState:
        """The state of a single process (shared), without touching Accelerate or torch.distributed."""
        global _LOCAL
        if _LOCAL is None:
            _LOCAL = cls(cpu=True, launched=False)
        return _LOCAL

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 and dist.is_available() and dist.is_initialized()

    def plan(self, num_chains: int) -> WorkPlan:
        return plan_work(num_chains, self.num_processes, self.process_index)

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Every process waits for the others (on GPUs with this process's device, so NCCL picks the right one)."""
        if not self.distributed:
            return
        if self.collective_device.type == "cuda":
            dist.barrier(device_ids=[self.collective_device.index])
        else:
            dist.barrier()

    def group(self, ranks: Sequence[int]) -> Optional[Any]:
        """A process group over `ranks` (created by every process, once, in the same order)."""
        if not self.distributed or len(ranks) == self.num_processes:
            return None
        return self._groups[tuple(ranks)]

    def make_groups(self, plan: WorkPlan) -> None:
        """Every process creates every group (torch requires it), in the same order."""
        if not self.distributed or plan.num_groups in (1, self.num_processes):
            return
        for g in range(plan.num_groups):
            ranks = tuple(range(g, self.num_processes, plan.num_groups))
            if ranks not in self._groups:
                self._groups[ranks] = dist.new_group(list(ranks))

    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum tensors over all processes, in place."""
        if not self.distributed:
            return
        for t in tensors:
            if t.device == self.collective_device:
                dist.all_reduce(t)
            else:
                moved = t.to(self.collective_device)
                dist.all_reduce(moved)
                t.copy_(moved)

    def all_gather_columns(self, local: torch.Tensor, columns: List[torch.Tensor], ranks: Sequence[int]) -> None:
        """Fill `local` [k, n] in place: member s of `ranks` evaluated the columns `columns[s]` (index tensors)."""
        if not self.distributed or len(ranks) == 1:
            return
        width = max(int(c.numel()) for c in columns)
        mine = columns[list(ranks).index(self.process_index)].to(local.device)
        send = torch.zeros(local.shape[0], width, dtype=local.dtype, device=self.collective_device)
        send[:, : mine.numel()] = local[:, mine].to(self.collective_device)
        received = [torch.empty_like(send) for _ in ranks]
        dist.all_gather(received, send, group=self.group(ranks))
        for cols, values in zip(columns, received):
            if cols.numel():
                local[:, cols.to(local.device)] = values[:, : cols.numel()].to(local.device)

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.num_processes
        dist.all_gather_object(out, obj)
        return out

    def group_all_gather_object(self, obj: Any, ranks: Sequence[int]) -> List[Any]:
        """`obj` of every member of the group `ranks` (this process's group)."""
        if not self.distributed or len(ranks) == 1:
            return [obj]
        out: List[Any] = [None] * len(ranks)
        dist.all_gather_object(out, obj, group=self.group(ranks))
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def raise_if_any_failed(self, error: Optional[BaseException]) -> None:
        """Collective: when any process failed, every process raises (its own error, or the first rank's)."""
        report = None if error is None else (self.process_index, type(error).__name__, str(error))
        failures = [r for r in self.all_gather_object(report) if r is not None]
        if error is not None:
            raise error
        if failures:
            rank, kind, message = failures[0]
            from kronfluence_bif.errors import SamplerDivergenceError

            cls = SamplerDivergenceError if kind == SamplerDivergenceError.__name__ else RuntimeError
            raise cls(f"Process {rank} failed ({kind}): {message}")

    def on_main(self, fn, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the main process only; its result (or its exception) reaches every process."""
        result, error = None, None
        if self.is_main_process:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised on every process below
                error = exc
        if not self.distributed:
            if error is not None:
                raise error
            return result
        if error is not None:
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001 - an unpicklable exception must still reach every process
                error = RuntimeError(f"{type(error).__name__}: {error}")
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module SGLD moves: DDP's inner module; FSDP-sharded models are refused (each process needs all of w*)."""
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp_types.append(FSDPModule)
    except ImportError:  # pragma: no cover - older torch
        pass
    if fsdp_types and isinstance(model, tuple(fsdp_types)):
        raise ValueError(
            "The model is wrapped in FSDP. BIF runs whole chains on each process and needs every process to hold "
            "all the trained weights, so pass the model before `apply_fsdp`/`fully_shard` (each process keeps a full "
            "replica; no gradient all-reduce happens while sampling)."
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


_STATE: Optional[ProcessState] = None  # the launched run's state, created once (Accelerate's is a singleton too)
_LOCAL: Optional[ProcessState] = None


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit (a peer may already be gone)
            pass


def launched_distributed() -> bool:
    """True under torchrun / accelerate launch with more than one process, or with a process group already up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(model: Optional[nn.Module] = None) -> ProcessState:
    """The one process state every module asks: single-process unless launched by torchrun / accelerate launch.

    A launched run's state is created on the first call, with gloo when `model`'s weights are on the CPU and nccl
    on GPUs, and is the same object for every later call (its process groups are created once).
    """
    global _STATE
    if not launched_distributed():
        return ProcessState.local()
    if _STATE is None:
        first = None if model is None else next(iter(model.parameters()), None)
        _STATE = ProcessState(cpu=first is None or first.device.type == "cpu")
    return _STATE
