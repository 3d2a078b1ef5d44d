"""Seeds of the chains: a function of (seed, chain) only, so a chain is the same whatever the process layout.

With antithetic chains (`BIFArguments.antithetic_chains`) chain 2j + 1 mirrors chain 2j: it draws its noise and
minibatches from chain 2j's seeds and negates the noise (`mirrors`), so where the drift is linear it is exactly
chain 2j reflected through w*. Each chain alone is still an exact chain (-xi is N(0, I) too); the pair's draws
cancel the odd-order parts of the values (a value's linear part times another's quadratic part) in the pooled
moments, which is most of what the linear control variate leaves to the draws (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import torch


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`: depends on (seed, chain) only, never on the process layout."""
    return int(np.random.SeedSequence([seed, chain, 0xB1F]).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`'s minibatch order (distinct from its noise seed `chain_seed`)."""
    return chain_seed(seed, chain) ^ 0x5EED


def seed_source(chain: int, antithetic: bool) -> int:
    """The chain whose seeds chain `chain` draws with: its partner 2j for an antithetic chain 2j + 1, else itself."""
    return chain - 1 if antithetic and chain % 2 == 1 else chain


def mirrors(chain: int, antithetic: bool) -> bool:
    """Whether chain `chain` negates its (partner's) noise."""
    return seed_source(chain, antithetic) != chain


def noise_generator(seed: int, chain: int, antithetic: bool, device: torch.device) -> torch.Generator:
    """Chain `chain`'s noise generator (its partner's seed for a mirrored chain)."""
    return torch.Generator(device=device).manual_seed(chain_seed(seed, seed_source(chain, antithetic)))


def stream_generator(seed: int, chain: int, antithetic: bool) -> torch.Generator:
    """Chain `chain`'s minibatch-order generator (its partner's seed for a mirrored chain: the same minibatches)."""
    return torch.Generator().manual_seed(stream_seed(seed, seed_source(chain, antithetic)))
