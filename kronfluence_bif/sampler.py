"""The samplers, under their historical module name: see `kronfluence_bif.samplers` (one module per sampler)."""

from kronfluence_bif.samplers import SAMPLERS, RMSpropSGLD, Sampler, SamplerContext, SketchSGLD, register_sampler
from kronfluence_bif.samplers.sgld import SGLD

__all__ = ["RMSpropSGLD", "SAMPLERS", "SGLD", "Sampler", "SamplerContext", "SketchSGLD", "register_sampler"]
