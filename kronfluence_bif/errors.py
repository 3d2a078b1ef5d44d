"""Exceptions raised by kronfluence-bif (a leaf module: it imports nothing from the package)."""


class SamplerDivergenceError(RuntimeError):
    """An SGLD chain produced non-finite values or left the neighbourhood of w*; nothing was written."""


class TaskContractError(ValueError):
    """A Task's method returned something BIF cannot use (wrong shape, or sums that disagree)."""


__all__ = ["SamplerDivergenceError", "TaskContractError"]
