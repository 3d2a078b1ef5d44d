"""A full-batch step's gradient from the draw's own forwards of every training example (`Evaluator.evaluate`)."""

from __future__ import annotations

import logging

import torch
from conftest import PlainRegressionTask

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.engine.evaluation import Evaluator
from kronfluence_bif.engine.gradients import StepGradient


def _scores(tmp_path, model, task, data, name, **bif):
    train, query = data
    args = BIFArguments(num_chains=2, num_draws=12, checkpoint_interval=0, **bif)
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4)
    return analyzer.load_pairwise_scores("pw")["all_modules"]


def _given(monkeypatch) -> list:
    """Per step: did its gradient come from the last draw's forwards?"""
    calls, real = [], StepGradient.__call__

    def counted(self, batch, batch_size, given=None):
        calls.append(given is not None)
        return real(self, batch, batch_size, given)

    monkeypatch.setattr(StepGradient, "__call__", counted)
    return calls


def test_the_draws_forwards_give_the_full_batch_steps_gradient(tmp_path, trained_mlp, small_data, monkeypatch):
    """Every step after a draw but the last takes the draw's gradient, and the scores are those of separate
    forwards: bitwise where the Task's summed loss is the sum of its per-example losses (`RegressionTask`), to
    float rounding where the per-example values are derived by vmap (a plain kronfluence Task)."""
    for task in (RegressionTask(), PlainRegressionTask()):
        model = prepare_model(trained_mlp, task)
        given = _given(monkeypatch)
        args = dict(sampler="subspace_sgld", nbeta=1e4, localization=1e2)  # full batch; no pilot
        fused = _scores(tmp_path, model, task, small_data, f"fused_{type(task).__name__}", **args)
        assert sum(given) == 2 * 11 and len(given) == 2 * (20 + 12)
        monkeypatch.setattr(Evaluator, "fuses_gradient", lambda self, stream, mine: False)
        given.clear()
        apart = _scores(tmp_path, model, task, small_data, f"apart_{type(task).__name__}", **args)
        assert sum(given) == 0
        monkeypatch.undo()
        if isinstance(task, RegressionTask):
            assert torch.equal(fused, apart)
        else:
            torch.testing.assert_close(fused, apart, rtol=1e-4, atol=1e-6 * float(apart.abs().max()))


def test_minibatch_steps_take_their_own_gradient(tmp_path, trained_mlp, small_data, monkeypatch):
    task = RegressionTask()
    model = prepare_model(trained_mlp, task)
    given = _given(monkeypatch)
    _scores(tmp_path, model, task, small_data, "mini", sampler="sgld", step_size=1e-4, sampler_batch_size=8)
    assert given and not any(given)


def test_a_view_without_a_gradient_falls_back_to_separate_forwards(
    tmp_path, trained_mlp, small_data, monkeypatch, caplog
):
    """Where x's forwards do not differentiate (here: made to fail), the run logs it once and every step runs its
    own forward and backward: the scores of a run that never tried."""
    task = RegressionTask()
    model = prepare_model(trained_mlp, task)
    args = dict(sampler="subspace_sgld", nbeta=1e4, localization=1e2)
    monkeypatch.setattr(Evaluator, "fuses_gradient", lambda self, stream, mine: False)
    apart = _scores(tmp_path, model, task, small_data, "apart", **args)
    monkeypatch.undo()

    def broken(self, row, params):
        raise RuntimeError("no vmap rule for this backward")

    monkeypatch.setattr(Evaluator, "_train_gradient", broken)
    given = _given(monkeypatch)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        fallback = _scores(tmp_path, model, task, small_data, "fallback", **args)
    assert caplog.text.count("do not give the step's gradient here (RuntimeError: no vmap rule") == 1
    assert not any(given)
    assert torch.equal(fallback, apart)
