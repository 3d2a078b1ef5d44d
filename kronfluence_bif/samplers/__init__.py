"""Samplers of the BIF posterior: a `Sampler` protocol (`base`), and the registered ones.

`SAMPLERS` maps each `BIFArguments.sampler` name to its class; importing this package registers the built-in
four (`sgld`, `rmsprop_sgld`, `sketch_sgld`, `subspace_sgld`). A new sampler: subclass `Sampler`, decorate it with
`register_sampler("name")`, and import its module before building `BIFArguments(sampler="name")`.
"""

from kronfluence_bif.samplers.base import (
    SAMPLERS,
    LinearSpan,
    Sampler,
    SamplerContext,
    make_sampler,
    register_sampler,
    sampler_class,
)
from kronfluence_bif.samplers.rmsprop import RMSpropSGLD
from kronfluence_bif.samplers.sgld import SGLD
from kronfluence_bif.samplers.sketch import SketchSGLD
from kronfluence_bif.samplers.subspace import SubspaceSGLD

__all__ = [
    "LinearSpan",
    "RMSpropSGLD",
    "SAMPLERS",
    "SGLD",
    "Sampler",
    "SamplerContext",
    "SketchSGLD",
    "SubspaceSGLD",
    "make_sampler",
    "register_sampler",
    "sampler_class",
]
