"""Plain SGLD (Welling & Teh 2011): the Langevin update with G = 1."""

from __future__ import annotations

from kronfluence_bif.samplers.base import Sampler, register_sampler


@register_sampler("sgld")
class SGLD(Sampler):
    """Plain SGLD on `params` (updated in place), localized at `anchors`: `Sampler`'s update with G = 1."""

    default_step_size = 3e-4
