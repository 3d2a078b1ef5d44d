"""Wall time and peak resident memory of a block of code, for the demos' and benchmarks' cost reports.

    with measure() as usage:
        analyzer.compute_pairwise_scores(...)
    print(usage.seconds, usage.peak_mib)

A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional


@dataclass
class Usage:
    """Wall time (s) and peak resident memory (MiB) of a block; `peak_delta_mib` is above the RSS at its start."""

    seconds: float = 0.0
    peak_mib: float = 0.0
    peak_delta_mib: float = 0.0
    exact_peak: bool = True


def _status_kib(key: str) -> Optional[int]:
    try:
        match = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Iterator[Usage]:
    """Time a block and record its peak RSS (exact on Linux; else the process peak from `getrusage`)."""
    usage = Usage()
    exact = _reset_peak_rss()
    start_rss = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") if exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            usage.exact_peak = False
        usage.peak_mib = peak / 1024
        usage.peak_delta_mib = max(0.0, (peak - start_rss) / 1024)
