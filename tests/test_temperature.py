"""The temperature pilot (BIFArguments.calibrate_temperature): which rung it takes, and that it leaves no trace."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, state_copy

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.engine import temperature
from kronfluence_bif.samplers import SAMPLERS


def _run(tmp_path, model, task, train, query, args, name):
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    ran = json.loads((tmp_path / name / "scores_pw" / "bif_diagnostics.json").read_text())["sampler_arguments"]
    return analyzer.load_pairwise_scores("pw")["all_modules"], ran


def test_who_sets_the_temperature():
    assert BIFArguments().calibrate_temperature is True
    assert BIFArguments(sampler="subspace_sgld").calibrate_temperature is True
    # a temperature set by the user is kept: either field set turns the pilot off
    assert BIFArguments(nbeta=1e5).calibrate_temperature is False
    assert BIFArguments(sampler="subspace_sgld", localization=1e3).calibrate_temperature is False
    # samplers without a ladder never calibrate; "auto" resolving to one of them drops the flag
    assert BIFArguments(sampler="rmsprop_sgld", calibrate_temperature=True).calibrate_temperature is False
    assert BIFArguments().resolved(10**9).calibrate_temperature is False
    ladder = SAMPLERS["subspace_sgld"].temperature_ladder
    assert ladder and all(abs(g / b - 1e-2) < 1e-12 for b, g in ladder)  # every rung at the defaults' damping 0.01
    assert [b for b, _ in ladder] == sorted(b for b, _ in ladder)  # hottest first
    with pytest.raises(ValueError, match="calibrate_temperature must be True or False"):
        BIFArguments(calibrate_temperature="yes")


def test_the_pilot_takes_the_hottest_stable_rung_and_leaves_no_trace(tmp_path, trained_mlp, small_data, caplog):
    """The run at the pilot's rung is bitwise the run with that rung set by hand (pilot off): the pilot's steps
    change neither the weights, nor the chains' noise, nor their minibatches."""
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    common = dict(num_chains=2, num_draws=30, checkpoint_interval=0)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        piloted, ran = _run(tmp_path, model, task, train, query, BIFArguments(**common), "piloted")
    hottest = SAMPLERS["subspace_sgld"].temperature_ladder[0]
    assert (ran["nbeta"], ran["localization"]) == hottest
    assert "Temperature pilot: nbeta 10000, localization 100: stable" in caplog.text
    fixed = BIFArguments(**common, sampler="subspace_sgld", nbeta=hottest[0], localization=hottest[1])
    by_hand, ran_by_hand = _run(tmp_path, model, task, train, query, fixed, "by_hand")
    assert ran_by_hand["calibrate_temperature"] is False
    assert torch.equal(piloted, by_hand)
    assert_bitwise_equal(model, saved)


def test_no_stable_rung_means_the_samplers_defaults(tmp_path, trained_mlp, small_data, caplog, monkeypatch):
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    monkeypatch.setattr(temperature, "RISE_RATIO", 0.0)  # any rise over w* fails: no rung is stable
    common = dict(num_chains=2, num_draws=30, checkpoint_interval=0)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        fallback, ran = _run(tmp_path, model, task, train, query, BIFArguments(**common), "fallback")
    assert "unstable" in caplog.text and "no hotter rung was stable" in caplog.text
    defaults = SAMPLERS["subspace_sgld"].defaults
    assert (ran["nbeta"], ran["localization"]) == (defaults["nbeta"], defaults["localization"])
    explicit = BIFArguments(**common, nbeta=defaults["nbeta"], localization=defaults["localization"])
    by_hand, _ = _run(tmp_path, model, task, train, query, explicit, "explicit")
    assert torch.equal(fallback, by_hand)


def test_the_rise_is_measured_against_w_star():
    losses = torch.tensor([1.0, 1.5, 2.0, 2.0], dtype=torch.float64)
    nan = torch.full_like(losses, float("nan"))
    # full batch: the first step's loss is the loss at w*
    assert temperature._rise(losses, nan, full_batch=True) == pytest.approx(1.0)
    # minibatches with the control variate: each against the same minibatch at w*
    assert temperature._rise(losses, torch.full_like(losses, 1.75), full_batch=False) == pytest.approx(0.25)
    assert temperature._rise(losses, nan, full_batch=False) is None  # nothing to compare with
