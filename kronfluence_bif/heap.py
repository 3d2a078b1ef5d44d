"""The Python heap while sampling: what is alive when the chains start is left out of the garbage collector's scans.

A process that imported torch, kronfluence and transformers holds a few hundred thousand container objects. Every
so often CPython's collector scans all of them (a generation-2 collection, triggered by allocation counts), which
took 140-210 ms on the demo UCI MLP's process: 13% of a 4 chains x 50 draws run, and all of BIF's margin over its
floor (`benchmarks/floor_uci_sgld.py`; the plain-torch floor allocates fewer objects per step and was not hit).
`frozen_heap` moves the objects alive at the start to the collector's permanent generation (`gc.freeze`), so
collections during sampling scan only what sampling allocates, and moves them back afterwards (`gc.unfreeze`).
Nothing is leaked or kept alive by this: frozen objects are still freed by reference counting, and cycles among
them are collected after the run. Where the caller has frozen objects already (`gc.get_freeze_count() > 0`, e.g. a
forking server or a test harness) the heap is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, the collector does not rescan the objects alive on entry (see the module docstring)."""
    if gc.get_freeze_count() > 0 or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
