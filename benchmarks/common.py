"""What the timing benchmarks share: quiet logs, pinned threads, the machine they ran on, their JSON summary."""

from __future__ import annotations

import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Dict, Type


def quiet(threads: int, level: int = logging.ERROR, category: Type[Warning] = Warning) -> None:
    """Silence `category` warnings and package logs below `level`; pin torch to `threads` threads."""

    warnings.filterwarnings("ignore", category=category)
    logging.getLogger("kronfluence_bif").setLevel(level)
    from kronfluence_bif.threads import set_threads

    set_threads(threads)


def describe_machine(threads: int) -> Dict[str, Any]:
    """Print and return the cores, threads, torch and Python versions the figures were measured with."""
    import torch

    machine = {
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print("machine:", json.dumps(machine), flush=True)
    return machine


def write_json(path: str, payload: Any) -> None:
    """Write the summary when a path was given (`--json`)."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))


def print_row(row: Dict[str, Any]) -> None:
    """One JSON line, floats rounded to 4 digits (the LDS scripts' output rows)."""
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
