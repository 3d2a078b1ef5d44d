"""The per-token EK-FAC and BIF runs of the demo, through one kronfluence-bif `Analyzer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from kronfluence_bif import FactorArguments, ScoreArguments
from kronfluence_bif.demo.tiny_lm.corpus import TokenDataset
from kronfluence_bif.storage import BIF_TOKEN_SCORES_FILE
from kronfluence_bif.tasks import IGNORE_INDEX
from kronfluence_bif.usage import Usage, measure

# kronfluence-bif's defaults ("auto": subspace-SGLD on a minibatch of 64 of the 1803 sequences, with the control
# variate), with fewer and shorter chains and a rank-64 span for a CPU demo, and correlations (the paper's
# normalized BIF, used for its figures)
DEFAULT_BIF_ARGS: Dict[str, Any] = {
    "num_chains": 2,
    "num_draws": 300,
    "sketch_rank": 64,
    "normalize": True,
}


def score_inputs(train: TokenDataset, queries: TokenDataset) -> Dict[str, np.ndarray]:
    """Token ids and masks as numpy arrays; scored tokens are those with a label at positions > 0."""
    query_valid = queries.labels.numpy() != IGNORE_INDEX
    train_valid = train.labels.numpy() != IGNORE_INDEX
    query_valid[:, 0] = train_valid[:, 0] = False
    return {
        "query_ids": queries.input_ids.numpy(),
        "query_labels": queries.labels.numpy(),
        "query_valid": query_valid,
        "train_ids": train.input_ids.numpy(),
        "train_mask": train.attention_mask.numpy().astype(bool),
        "train_valid": train_valid,
    }


def _pairwise_kwargs(queries: TokenDataset, train_indices: Optional[Sequence[int]], batch_size: int) -> Dict[str, Any]:
    return dict(
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        train_indices=None if train_indices is None else list(train_indices),
        score_args=ScoreArguments(compute_per_token_scores=True),
        overwrite_output_dir=True,
    )


def run_ekfac_per_token(
    analyzer: Any,
    train: TokenDataset,
    queries: TokenDataset,
    train_indices: Optional[Sequence[int]] = None,
    batch_size: int = 32,
) -> Tuple[np.ndarray, Usage]:
    """EK-FAC factors (on all of `train`) and per-token scores ``[n_query, n_scored, T]``, with time and memory."""
    with measure() as usage:
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        kwargs = _pairwise_kwargs(queries, train_indices, batch_size)
        analyzer.compute_pairwise_scores("ekfac_per_token", "ekfac", queries, train, **kwargs)
    return analyzer.load_pairwise_scores("ekfac_per_token")["all_modules"].float().numpy(), usage


def run_bif_per_token(
    analyzer: Any,
    train: TokenDataset,
    queries: TokenDataset,
    bif_args: Any,
    train_indices: Optional[Sequence[int]] = None,
    batch_size: int = 32,
) -> Tuple[np.ndarray, Optional[np.ndarray], Usage]:
    """BIF per-token scores ``[Q, N, Tt]`` and token-by-token ``[Q, Tq, N, Tt]`` (None when `token_by_token` is off).

    The posterior conditions on all of `train`; only `train_indices` are scored (paper, App. C).
    """
    with measure() as usage:
        analyzer.fit_all_factors(
            "bif", train, factor_args=FactorArguments(strategy="bif"), bif_args=bif_args, overwrite_output_dir=True
        )
        kwargs = _pairwise_kwargs(queries, train_indices, batch_size)
        analyzer.compute_pairwise_scores("bif_per_token", "bif", queries, train, **kwargs)
    per_token = analyzer.load_pairwise_scores("bif_per_token")["all_modules"].float().numpy()
    token_file = Path(analyzer.output_dir) / "scores_bif_per_token" / BIF_TOKEN_SCORES_FILE
    token_scores = analyzer.load_file(token_file)["all_modules"].float().numpy() if token_file.exists() else None
    return per_token, token_scores, usage
