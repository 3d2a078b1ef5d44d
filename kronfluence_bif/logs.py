"""The package's one logger (`kronfluence_bif`), shared by every module."""

import logging

logger = logging.getLogger("kronfluence_bif")

_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Log a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)
