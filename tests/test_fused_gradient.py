"""A full-batch step's gradient from the draw's own forwards of every training example (`Evaluator.evaluate`)."""

from __future__ import annotations

import logging

import torch
from conftest import PlainRegressionTask, record_step_gradients

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.engine.evaluation import Evaluator


def _scores(tmp_path, model, task, data, name, train_batch=None, **bif):
    train, query = data
    args = BIFArguments(num_chains=2, num_draws=12, checkpoint_interval=0, **bif)
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores(
        "pw",
        "f",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=4,
        per_device_train_batch_size=train_batch,
    )
    return analyzer.load_pairwise_scores("pw")["all_modules"]


def test_the_draws_forwards_give_the_full_batch_steps_gradient(tmp_path, trained_mlp, small_data, monkeypatch):
    """Every step after a draw but the last takes the draw's gradient. With the 48 examples in one evaluation batch
    the scores are bitwise those of separate forwards, for a Task with per-example losses (`RegressionTask`) and for
    one whose per-example values are derived by vmap (a plain kronfluence Task); in three batches of 16 the gradient
    is summed batch by batch, a float32 summation order of its own, which the chains carry along their 32 steps
    (measured: 2e-6 and 6e-6 of the largest score)."""
    args = dict(sampler="subspace_sgld", nbeta=1e4, localization=1e2)  # full batch; no pilot
    for task in (RegressionTask(), PlainRegressionTask()):
        model = prepare_model(trained_mlp, task)
        for train_batch in (None, 16):
            label = f"{type(task).__name__}_{train_batch}"
            given = record_step_gradients(monkeypatch)
            fused = _scores(tmp_path, model, task, small_data, f"fused_{label}", train_batch, **args)
            assert sum(given) == 2 * 11 and len(given) == 2 * (20 + 12)
            monkeypatch.setattr(Evaluator, "fuses_gradient", lambda self, stream, mine: False)
            given.clear()
            apart = _scores(tmp_path, model, task, small_data, f"apart_{label}", train_batch, **args)
            assert sum(given) == 0
            monkeypatch.undo()
            if train_batch is None:
                assert torch.equal(fused, apart)
            else:
                torch.testing.assert_close(fused, apart, rtol=0.0, atol=2e-5 * float(apart.abs().max()))


def test_minibatch_steps_take_their_own_gradient(tmp_path, trained_mlp, small_data, monkeypatch):
    task = RegressionTask()
    model = prepare_model(trained_mlp, task)
    given = record_step_gradients(monkeypatch)
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
    given = record_step_gradients(monkeypatch)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        fallback = _scores(tmp_path, model, task, small_data, "fallback", **args)
    assert caplog.text.count("do not give the step's gradient here (RuntimeError: no vmap rule") == 1
    assert not any(given)
    assert torch.equal(fallback, apart)
