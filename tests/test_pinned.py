"""Scores pinned before the architecture refactor (issue 13): every sampler, pairwise and self, on a fixed seed.

Per-token, multi-process and resumed runs are pinned where those runs already happen (test_per_token,
test_distributed, test_resume), through `conftest.check_pinned`.
"""

from __future__ import annotations

import pytest
from conftest import PIN_ARGS, PlainRegressionTask, check_pinned

from kronfluence_bif import Analyzer, BIFArguments, prepare_model


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sketch_sgld"])
def test_scores_are_the_pinned_ones(sampler, tmp_path, trained_mlp, small_data):
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    extra = {"sketch_rank": 8, "step_size": 0.05} if sampler == "sketch_sgld" else {}
    args = BIFArguments(**{**PIN_ARGS, "sampler": sampler, **extra})
    analyzer = Analyzer("pin", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    analyzer.compute_self_scores("self", "f", train_dataset=train, per_device_train_batch_size=16)
    check_pinned(f"{sampler}/pairwise", analyzer.load_pairwise_scores("pw")["all_modules"])
    check_pinned(f"{sampler}/self", analyzer.load_self_scores("self")["all_modules"])
