"""The package's one logger (`kronfluence_bif`), shared by every module; it speaks on the main process only.

As kronfluence's logger, it is silent on the other processes of a `torchrun` / `accelerate launch` run, where
every process would otherwise repeat the same lines; errors still come from every process, tagged with its rank.
"""

import logging
import os

import torch.distributed as dist

logger = logging.getLogger("kronfluence_bif")

_warned: set = set()


def process_rank() -> int:
    """This process's rank: torch.distributed's once a group is up, else the launcher's RANK (0 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class MainProcessOnly(logging.Filter):
    """Passes every record on rank 0; on the other ranks only errors, prefixed with the rank (every record when
    `enabled` is False: kronfluence's `log_main_process_only=False`)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        if rank == 0 or not self.enabled:
            return True
        if record.levelno >= logging.ERROR:
            record.msg = f"[rank {rank}] {record.msg}"
            return True
        return False


_MAIN_ONLY = MainProcessOnly()
logger.addFilter(_MAIN_ONLY)


def set_main_process_only(enabled: bool) -> None:
    """Whether processes other than rank 0 stay silent below ERROR (the Analyzer's `log_main_process_only`)."""
    _MAIN_ONLY.enabled = bool(enabled)


def warn_once(key: str, message: str) -> None:
    """Log a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)
