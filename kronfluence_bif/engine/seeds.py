"""Seeds of the chains: a function of (seed, chain) only, so a chain is the same whatever the process layout."""

from __future__ import annotations

import numpy as np


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`: depends on (seed, chain) only, never on the process layout."""
    return int(np.random.SeedSequence([seed, chain, 0xB1F]).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream_seed(seed: int, chain: int) -> int:
    """Seed of chain `chain`'s minibatch order (distinct from its noise seed `chain_seed`)."""
    return chain_seed(seed, chain) ^ 0x5EED
