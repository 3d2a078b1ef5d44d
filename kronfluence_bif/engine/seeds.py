"""Seeds of the chains: a function of (seed, chain) only, so a chain is the same whatever the process layout.

With antithetic chains (`BIFArguments.antithetic_chains`) chain 2j + 1 mirrors chain 2j: it draws its noise and
minibatches from chain 2j's seeds and negates the noise (`chain_sampler`), so where the drift is linear it is exactly
chain 2j reflected through w*. Each chain alone is still an exact chain (-xi is N(0, I) too); the pair's draws
cancel the odd-order parts of the values (a value's linear part times another's quadratic part) in the pooled
moments, which is most of what the linear control variate leaves to the draws (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kronfluence_bif.samplers import make_sampler

if TYPE_CHECKING:
    from kronfluence_bif.arguments import BIFArguments
    from kronfluence_bif.samplers import Sampler, SamplerContext
    from kronfluence_bif.samplers.base import Vectors


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`: depends on (seed, chain) only, never on the process layout."""
    return int(np.random.SeedSequence([seed, chain, 0xB1F]).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`'s minibatch order (distinct from its noise seed `chain_seed`)."""
    return chain_seed(seed, chain) ^ 0x5EED


def seed_source(chain: int, antithetic: bool) -> int:
    """The chain whose seeds chain `chain` draws with: its partner 2j for an antithetic chain 2j + 1, else itself."""
    return chain - 1 if antithetic and chain % 2 == 1 else chain


def chain_sampler(
    args: BIFArguments, chain: int, params: Vectors, anchors: Vectors, context: SamplerContext, device: torch.device
) -> Sampler:
    """Chain `chain`'s sampler over `params`, its noise generator seeded by (seed, chain), or by its partner's seed
    and negated for a mirrored chain (the chains, the lockstep lanes and the temperature pilot all start here)."""
    source = seed_source(chain, args.antithetic_chains)
    generator = torch.Generator(device=device).manual_seed(chain_seed(args.seed, source))
    return make_sampler(args, params, anchors, generator, context, mirror=source != chain)


def stream_generator(seed: int, chain: int, antithetic: bool) -> torch.Generator:
    """Chain `chain`'s minibatch-order generator (its partner's seed for a mirrored chain: the same minibatches)."""
    return torch.Generator().manual_seed(stream_seed(seed, seed_source(chain, antithetic)))
