"""sampler="auto" (the default): which sampler it resolves to, what the run records, and the fields it fills."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, state_copy

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.arguments import AUTO_MINIBATCH, AUTO_SPAN_BYTES
from kronfluence_bif.samplers import SAMPLERS


def test_auto_takes_subspace_sgld_while_its_span_fits_and_the_batch_is_unset():
    args = BIFArguments()
    assert args.sampler == "auto" and args.step_size is None and args.nbeta is None
    rank = SAMPLERS["subspace_sgld"].defaults["sketch_rank"]
    largest = AUTO_SPAN_BYTES // (4 * rank)  # the most weights whose fp32 span basis fits
    small = args.resolved(largest)
    assert small.sampler == "subspace_sgld"
    assert (small.step_size, small.nbeta, small.localization) == (1.0, 1e5, 1e3)
    assert (small.sampler_batch_size, small.num_burnin_steps, small.sketch_rank, small.center_gradient) == (
        None,
        20,
        rank,
        True,
    )
    large = args.resolved(largest + 1)
    assert large.sampler == "rmsprop_sgld"
    assert (large.step_size, large.nbeta, large.sampler_batch_size, large.center_gradient) == (3e-4, 1e3, 64, False)
    # a full batch only while it costs about what the draws evaluate anyway: a posterior over more examples than
    # twice the scored ones takes a minibatch of AUTO_MINIBATCH, with the control variate
    full = args.resolved(10, num_train=200, num_evaluated=100)
    assert (full.sampler, full.sampler_batch_size, full.control_variate) == ("subspace_sgld", None, True)
    mini = args.resolved(10, num_train=201, num_evaluated=100)
    assert (mini.sampler, mini.sampler_batch_size, mini.control_variate) == ("subspace_sgld", AUTO_MINIBATCH, True)
    assert (mini.nbeta, mini.localization, mini.step_size) == (1e5, 1e3, 1.0)
    # a "minibatch" of the whole training set is the full batch (None), where the linear control variate applies
    assert args.resolved(10, num_train=50, num_evaluated=10).sampler_batch_size is None
    # a minibatch size set by the user means a minibatch sampler; a set field is kept, the rest are filled
    assert BIFArguments(sampler_batch_size=32).resolved(10).sampler == "rmsprop_sgld"
    kept = BIFArguments(nbeta=1e4, num_burnin_steps=7).resolved(10)
    assert (kept.sampler, kept.nbeta, kept.num_burnin_steps, kept.localization) == ("subspace_sgld", 1e4, 7, 1e3)
    # an explicit sampler is resolved at construction
    explicit = BIFArguments(sampler="subspace_sgld")
    assert explicit.resolved(10**9) is explicit and explicit.nbeta == 1e5


def test_a_step_size_needs_an_explicit_sampler():
    with pytest.raises(ValueError, match=r"BIFArguments\.step_size=0\.001 needs an explicit `sampler`"):
        BIFArguments(step_size=1e-3)
    assert BIFArguments(sampler="sgld", step_size=1e-3).step_size == 1e-3


def test_the_default_run_records_what_it_sampled_with(tmp_path, trained_mlp, small_data, caplog):
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    args = BIFArguments(num_chains=2, num_draws=40, checkpoint_interval=0)
    analyzer = Analyzer("auto", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        analyzer.compute_pairwise_scores(
            "pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4
        )
    assert "sampler='auto': subspace_sgld for" in caplog.text
    scores = analyzer.load_pairwise_scores("pw")["all_modules"]
    assert scores.shape == (len(query), len(train)) and torch.isfinite(scores).all() and scores.abs().max() > 0
    folder = tmp_path / "auto" / "scores_pw"
    recorded = json.loads((folder / "bif_arguments.json").read_text())
    assert recorded["sampler"] == "auto" and recorded["nbeta"] is None  # the user's arguments, as given
    ran = json.loads((folder / "bif_diagnostics.json").read_text())["sampler_arguments"]
    assert ran["sampler"] == "subspace_sgld" and ran["center_gradient"] is True
    # the temperature pilot's rung, as logged: this small MLP is stable at the ladder's first
    assert ran["calibrate_temperature"] is True and (ran["nbeta"], ran["localization"]) == (1e4, 1e2)
    assert "Temperature pilot: nbeta 10000, localization 100: stable" in caplog.text
    # the resolved arguments reproduce the run exactly
    again = Analyzer("again", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    fields = {**ran, "checkpoint_interval": 0}
    again.fit_all_factors("f", dataset=train, bif_args=BIFArguments.from_dict(fields))
    again.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    assert torch.equal(again.load_pairwise_scores("pw")["all_modules"], scores)
    assert_bitwise_equal(model, saved)
