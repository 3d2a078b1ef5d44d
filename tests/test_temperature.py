"""The temperature pilot (BIFArguments.calibrate_temperature): which rung it takes, and that it leaves no trace."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, record_step_gradients, state_copy

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
    defaults = SAMPLERS["subspace_sgld"].defaults
    # each rung hotter than the defaults at their damping, or less damped at their localization
    damping = defaults["localization"] / defaults["nbeta"]
    for nbeta, gamma in ladder:
        hotter = nbeta < defaults["nbeta"] and gamma / nbeta == pytest.approx(damping)
        less_damped = gamma == defaults["localization"] and nbeta > defaults["nbeta"]
        assert hotter or less_damped, (nbeta, gamma)
    with pytest.raises(ValueError, match="calibrate_temperature must be True or False"):
        BIFArguments(calibrate_temperature="yes")


def test_the_pilot_takes_the_first_stable_rung_and_leaves_no_trace(
    tmp_path, trained_mlp, small_data, caplog, monkeypatch
):
    """The run at the pilot's rung is bitwise the run with that rung set by hand (pilot off): the pilot's steps
    change neither the weights, nor the chains' noise, nor their minibatches."""
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    # every rung passes (this 1-dimensional span is too sharp for the hot rungs at step 1): the first is taken
    monkeypatch.setattr(temperature, "RISE_RATIO", math.inf)
    monkeypatch.setattr(temperature, "SHARPNESS_LIMIT", math.inf)
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
    assert caplog.text.count(": unstable (") == len(SAMPLERS["subspace_sgld"].temperature_ladder)
    assert "no rung of the ladder was stable" in caplog.text
    defaults = SAMPLERS["subspace_sgld"].defaults
    assert (ran["nbeta"], ran["localization"]) == (defaults["nbeta"], defaults["localization"])
    explicit = BIFArguments(**common, nbeta=defaults["nbeta"], localization=defaults["localization"])
    by_hand, _ = _run(tmp_path, model, task, train, query, explicit, "explicit")
    assert torch.equal(fallback, by_hand)


def test_a_fallback_the_diagnostics_would_warn_about_gets_a_smaller_step(
    tmp_path, trained_mlp, small_data, caplog, monkeypatch
):
    """No rung stable and the defaults too sharp for the warning's limit: their step is lowered to 0.9 of what the
    sharpness allows, logged, recorded, and the run is the one set by hand with that step."""
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    monkeypatch.setattr(temperature, "RISE_RATIO", 0.0)  # no rung is stable
    monkeypatch.setattr(temperature, "SHARPNESS_LIMIT", 1e-3)  # and the defaults are "too sharp"
    common = dict(num_chains=2, num_draws=30, checkpoint_interval=0)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        fitted, ran = _run(tmp_path, model, task, train, query, BIFArguments(**common), "fitted")
    assert "at the defaults step x sharpness is" in caplog.text
    defaults = SAMPLERS["subspace_sgld"]
    assert (ran["nbeta"], ran["localization"]) == (defaults.defaults["nbeta"], defaults.defaults["localization"])
    assert 0.0 < ran["step_size"] < defaults.default_step_size
    found = float(caplog.text.split("at the defaults step x sharpness is ")[1].split(" ")[0])
    assert ran["step_size"] == pytest.approx(defaults.default_step_size * 0.9 * 1e-3 / found, rel=1e-2)  # %.3g
    fields = {k: ran[k] for k in ("nbeta", "localization", "step_size")}
    explicit = BIFArguments(**common, sampler="subspace_sgld", **fields)
    by_hand, _ = _run(tmp_path, model, task, train, query, explicit, "explicit")
    assert torch.equal(fitted, by_hand)


def test_the_rise_is_measured_against_w_star():
    losses = torch.tensor([1.0, 1.5, 2.0, 2.0], dtype=torch.float64)
    nan = torch.full_like(losses, float("nan"))
    # full batch: the first step's loss is the loss at w*
    assert temperature._rise(losses, nan, full_batch=True) == pytest.approx(1.0)
    # minibatches with the control variate: each against the same minibatch at w*
    assert temperature._rise(losses, torch.full_like(losses, 1.75), full_batch=False) == pytest.approx(0.25)
    assert temperature._rise(losses, nan, full_batch=False) is None  # nothing to compare with


def test_a_rung_the_diagnostics_would_warn_about_is_not_stable():
    # the rise is within its limit, but step x sharpness after the burn-in is above the sharpness warning's limit
    assert temperature.Verdict(rise=1.0, limit=4.0, sharpness=1.9).stable
    assert not temperature.Verdict(rise=1.0, limit=4.0, sharpness=2.1).stable
    assert not temperature.Verdict(rise=math.inf, limit=4.0).stable  # a loss that is not finite
    assert temperature.Verdict(rise=math.nan, limit=4.0).stable  # not measurable: finite losses suffice
    # over processes: the largest rise and sharpness, the smallest limit; one non-finite chain fails the rung
    worst = temperature.Verdict.worst([temperature.Verdict(1.0, 4.0, 0.5), temperature.Verdict(math.nan, 3.0, 1.5)])
    assert (worst.rise, worst.limit, worst.sharpness) == (1.0, 3.0, 1.5)
    assert not temperature.Verdict.worst([temperature.Verdict(1.0, 4.0), temperature.Verdict(math.inf, 4.0)]).stable


def test_a_pilot_that_raises_fails_its_rung(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(temperature, "pilot", broken)
    args = BIFArguments(sampler="subspace_sgld")
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        outcome = temperature._safe_pilot(None, None, args, [0], [0])
    assert not outcome.verdict.stable and not outcome.prefixes
    assert "failed (RuntimeError: out of memory)" in caplog.text


def test_column_blocks_pilot_once_and_sample_the_same_chains(tmp_path, trained_mlp, small_data, caplog):
    """Moment sums over budget re-run the same chains per block of training columns: the first block's pilot sets
    the temperature of all of them (one pilot), and the blocked scores are the unblocked ones."""
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    common = dict(num_chains=2, num_draws=30, checkpoint_interval=0)
    whole, _ = _run(tmp_path, model, task, train, query, BIFArguments(**common), "whole")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        blocked, ran = _run(tmp_path, model, task, train, query, BIFArguments(**common, moment_memory_gb=1e-6), "blk")
    assert "computing" in caplog.text and "blocks of training columns" in caplog.text
    assert caplog.text.count("Temperature pilot: nbeta 10000, localization 100:") == 1
    assert ran["calibrate_temperature"] is True and ran["nbeta"] == 1e4
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-7 * float(whole.abs().max()))


def test_the_chosen_rungs_chains_continue_from_the_pilot(tmp_path, trained_mlp, small_data, monkeypatch):
    """At the chosen rung the run continues each chain from the pilot's last draw (40 of 50 here: two blocks of 16
    flushed, 8 rows carried into the third; a checkpoint due in the prefix is skipped) instead of repeating its
    steps; the scores are bitwise those of the rung set by hand and of a run that keeps no prefix."""
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    monkeypatch.setattr(temperature, "RISE_RATIO", math.inf)  # the first rung is stable
    monkeypatch.setattr(temperature, "SHARPNESS_LIMIT", math.inf)
    common = dict(num_chains=2, num_draws=50, draws_per_block=16, checkpoint_interval=20)
    burn_in = SAMPLERS["subspace_sgld"].defaults["num_burnin_steps"]
    steps = record_step_gradients(monkeypatch)
    piloted, _ = _run(tmp_path, model, task, train, query, BIFArguments(**common), "piloted")
    assert len(steps) == 2 * (burn_in + 50)  # no step twice
    assert sum(steps) == 2 * 49  # full batch: every step after a draw but the last takes the draw's gradient
    steps.clear()
    monkeypatch.setattr(temperature, "PREFIX_BUDGET", 0)  # no prefix kept: the chains start over from w*
    over, _ = _run(tmp_path, model, task, train, query, BIFArguments(**common), "over")
    assert len(steps) == 2 * (burn_in + 40) + 2 * (burn_in + 50)
    assert sum(steps) == 2 * 39 + 2 * 49
    hottest = SAMPLERS["subspace_sgld"].temperature_ladder[0]
    fixed = BIFArguments(**common, sampler="subspace_sgld", nbeta=hottest[0], localization=hottest[1])
    by_hand, _ = _run(tmp_path, model, task, train, query, fixed, "by_hand")
    assert torch.equal(piloted, by_hand) and torch.equal(over, by_hand)
    assert_bitwise_equal(model, saved)


def test_a_run_interrupted_after_the_pilot_resumes_bitwise(tmp_path, trained_mlp, small_data, monkeypatch):
    """Chain 0 continued from its prefix and checkpointed at draw 60; stopped there, the resumed run (which pilots
    again) takes chain 0 from its checkpoint, not from the new prefix, and chain 1 from its prefix."""
    from kronfluence_bif.checkpoints import CheckpointStore

    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    monkeypatch.setattr(temperature, "RISE_RATIO", math.inf)
    monkeypatch.setattr(temperature, "SHARPNESS_LIMIT", math.inf)
    common = dict(num_chains=2, num_draws=70, draws_per_block=10, checkpoint_interval=30)
    reference, _ = _run(tmp_path / "ref", model, task, train, query, BIFArguments(**common), "s")
    written, real = [], CheckpointStore.save

    def save(self, chain, tensors, meta):
        real(self, chain, tensors, meta)
        written.append((chain, meta["draws_done"], meta["done"]))
        if len(written) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save", save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", model, task, train, query, BIFArguments(**common), "s")
    assert written == [(0, 60, False)]  # draw 30 fell inside the prefix (40 draws): skipped
    monkeypatch.setattr(CheckpointStore, "save", real)
    resumed, _ = _run(tmp_path / "run", model, task, train, query, BIFArguments(**common), "s")
    assert torch.equal(resumed, reference)


def test_a_diverging_pilot_chain_stops_within_ten_steps(tmp_path, trained_mlp, small_data, monkeypatch, caplog):
    """A rung whose chain's loss turns non-finite is rejected at the next check (every CHECK_EVERY steps), not after
    its 60 steps: here the first pilot chain's losses are made non-finite from its 6th step on."""
    from kronfluence_bif.engine.gradients import StepGradient

    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    monkeypatch.setattr(temperature, "SHARPNESS_LIMIT", math.inf)
    calls, starts = [], []
    real_step, real_pilot = StepGradient.__call__, temperature.PilotChain.pilot

    def poisoned(self, batch, batch_size, given=None):
        loss, grads = real_step(self, batch, batch_size, given)
        calls.append(None)
        return (loss * math.nan if len(starts) == 1 and len(calls) > 5 else loss), grads

    def pilot(self):
        starts.append((self.args.nbeta, len(calls)))
        return real_pilot(self)

    monkeypatch.setattr(StepGradient, "__call__", poisoned)
    monkeypatch.setattr(temperature.PilotChain, "pilot", pilot)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        _run(tmp_path, model, task, train, query, BIFArguments(num_chains=2, num_draws=30), "diverging")
    assert "Temperature pilot: nbeta 10000, localization 100: unstable (mean loss rise over w* inf" in caplog.text
    ladder = SAMPLERS["subspace_sgld"].temperature_ladder
    assert starts[0] == (ladder[0][0], 0) and starts[1] == (ladder[1][0], temperature.CHECK_EVERY)
