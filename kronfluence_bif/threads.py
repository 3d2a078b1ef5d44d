"""How many intra-op CPU threads the sampling phase uses, chosen once per run and restored afterwards.

A BIF draw is a few thousand short kernels (SGLD steps on small minibatches, then forwards over the evaluation
batches). With several intra-op threads each kernel above torch's grain size is an OpenMP parallel region that
waits for every thread: on a quiet machine that costs microseconds, but when another process shares the cores a
region waits until the descheduled thread runs again, and a run that takes 5 s alone can take minutes (measured
in BENCHMARKS.md, "Shared CPU"). So, on CPU and unless the user chose a thread count:

- models whose matrix products are small (on average below `SMALL_MATMUL_FLOPS` per product in one forward of the
  first evaluation batch) sample with one thread, which is as fast when the machine is quiet and does not
  collapse when it is busy;
- larger models use torch's thread count, but no more threads than there are idle cores when sampling starts
  (measured over a quarter second): next to other CPU-bound work even 2e9-flop products ran 6x slower on two
  threads than on one (BENCHMARKS.md). That choice depends on the machine's load, so pin `num_threads` when
  runs must agree bitwise.

The user's choice wins: `BIFArguments.num_threads`, else `OMP_NUM_THREADS` / `MKL_NUM_THREADS`, else a count set
with `set_threads(k)`, else a `torch.set_num_threads(k)` made after kronfluence_bif was imported (one made before
cannot be told from torch's default; use `set_threads` or `num_threads` then). For small models the decision depends
on shapes only, so a rerun (or a resumed run) uses the same count.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kronfluence_bif.logs import logger

# 1e8 flops is ~1-2 ms of one core's GEMM throughput: below it a parallel region gains less than it can lose by
# waiting for a descheduled thread on a shared CPU.
SMALL_MATMUL_FLOPS = 1e8
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_THREADS_AT_IMPORT = torch.get_num_threads()
_CHOSEN: Optional[int] = None  # the count of the last `set_threads` call
_MATMULS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
}


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count of the sampling phase and why (logged)."""

    threads: int
    reason: str


def set_threads(threads: int) -> None:
    """`torch.set_num_threads(threads)`, remembered as the user's choice, so BIF samples with it too."""
    global _CHOSEN
    torch.set_num_threads(threads)
    _CHOSEN = threads


def user_thread_setting() -> Optional[str]:
    """What fixed the thread count explicitly, or None when torch runs at its default."""
    for name in THREAD_ENV_VARS:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    if _CHOSEN is not None and torch.get_num_threads() == _CHOSEN:
        return f"set_threads({_CHOSEN})"
    if torch.get_num_threads() != _THREADS_AT_IMPORT:
        return f"torch.set_num_threads({torch.get_num_threads()})"
    return None


class _MatmulCounter(TorchDispatchMode):
    """Counts the matrix products (and convolutions, attention kernels) a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _MATMULS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def mean_matmul_flops(forward: Callable[[], Any]) -> Optional[float]:
    """Mean flops per matrix product of `forward()` (run once under no_grad); None when it cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = _MatmulCounter()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops, counter:
            forward()
    except Exception as exc:  # noqa: BLE001 - a heuristic must never stop the run
        logger.debug("Could not count the forward's flops (%s); keeping torch's thread count.", exc)
        return None
    if counter.calls == 0:
        return None
    return flops.get_total_flops() / counter.calls


def busy_cores(seconds: float = 0.25) -> Optional[float]:
    """How many cores other work keeps busy now (Linux /proc/stat over `seconds`, else the 1-minute load)."""

    def sample():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
        return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_threads(requested: Optional[int], device: torch.device, forward: Callable[[], Any]) -> ThreadChoice:
    """The sampling phase's intra-op thread count (see the module docstring)."""
    current = torch.get_num_threads()
    if requested is not None:
        return ThreadChoice(requested, "BIFArguments.num_threads")
    if device.type != "cpu":
        return ThreadChoice(current, f"torch's setting (the model is on {device.type})")
    explicit = user_thread_setting()
    if explicit is not None:
        return ThreadChoice(current, f"set by {explicit}")
    if current == 1:
        return ThreadChoice(1, "torch's setting")
    mean = mean_matmul_flops(forward)
    if mean is None:
        return ThreadChoice(current, "torch's setting (the forward's flops could not be counted)")
    if mean < SMALL_MATMUL_FLOPS:
        return ThreadChoice(
            1,
            f"small matrix products ({mean:.2g} flops each on average, below {SMALL_MATMUL_FLOPS:.0e}): one thread "
            "is as fast and does not slow down when other processes share the cores; set "
            "BIFArguments(num_threads=k) to override",
        )
    busy = busy_cores()
    idle = None if busy is None else max(1, math.floor(_available_cores() - busy + 0.5))
    if idle is not None and idle < current:
        return ThreadChoice(
            idle,
            f"matrix products of {mean:.2g} flops each, but other work keeps {busy:.1f} cores busy: {idle} of "
            f"torch's {current} threads, so no thread waits for a core; set BIFArguments(num_threads=k) to override",
        )
    return ThreadChoice(current, f"torch's setting (matrix products of {mean:.2g} flops each on average)")


@contextlib.contextmanager
def using_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then give back the caller's count (also after errors)."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
