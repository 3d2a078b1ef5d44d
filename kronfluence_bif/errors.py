"""Exceptions raised by kronfluence-bif."""

from kronfluence_bif.loss_views import TaskContractError


class SamplerDivergenceError(RuntimeError):
    """An SGLD chain produced non-finite values or left the neighbourhood of w*; nothing was written."""


__all__ = ["SamplerDivergenceError", "TaskContractError"]
