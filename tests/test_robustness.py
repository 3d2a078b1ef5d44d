"""The model is bitwise w* after normal, diverged and interrupted runs; a failed run writes no result."""

from typing import Any

import pytest
import torch
from conftest import PlainRegressionTask, assert_bitwise_equal, state_copy

from kronfluence_bif import Analyzer, BIFArguments, SamplerDivergenceError, prepare_model

FAST = dict(num_chains=2, num_draws=10, num_burnin_steps=5, sampler_batch_size=8)


def _analyzer(tmp_path, model, task, **bif):
    args = BIFArguments(**{**FAST, **bif})
    analyzer = Analyzer(
        "r", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=args
    )
    return analyzer


def _score(analyzer, small_data, name="s"):
    train, query = small_data
    analyzer.fit_all_factors("f", dataset=train, overwrite_output_dir=True)
    return analyzer.compute_pairwise_scores(
        name, "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5
    )


def test_normal_run_restores_bitwise_and_flags(tmp_path, trained_mlp, small_data):
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # a user model in train mode comes back in train mode (sampling itself runs in eval mode)
    _score(_analyzer(tmp_path, model, task), small_data)
    assert_bitwise_equal(model, saved)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training


def test_diverged_run_raises_restores_and_writes_nothing(tmp_path, trained_mlp, small_data):
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    analyzer = _analyzer(tmp_path, model, task, sampler="sgld", step_size=1.0, nbeta=1e4, localization=1.0)
    with pytest.raises(SamplerDivergenceError, match=r"chain 0 .*step_size.*nbeta.*localization"):
        _score(analyzer, small_data)
    assert_bitwise_equal(model, saved)
    assert not (tmp_path / "r" / "scores_s" / "pairwise_scores.safetensors").exists()
    assert not list((tmp_path / "r" / "scores_s").glob("*.safetensors"))


class InterruptingTask(PlainRegressionTask):
    """Raises KeyboardInterrupt inside the SGLD loop, as Ctrl-C would."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls = 0

    def compute_train_loss(self, batch: Any, model, sample: bool = False) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
        return super().compute_train_loss(batch, model, sample)


def test_interrupted_run_restores_bitwise(tmp_path, trained_mlp, small_data):
    task = InterruptingTask(after=12)
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    with pytest.raises(KeyboardInterrupt):
        _score(_analyzer(tmp_path, model, task), small_data)
    assert task.calls == 13  # it really stopped mid-chain, after the weights had moved
    assert_bitwise_equal(model, saved)
    assert not (tmp_path / "r" / "scores_s" / "pairwise_scores.safetensors").exists()
    # and the next run, uninterrupted, works on the same objects
    task.after = 10**9
    _score(_analyzer(tmp_path, model, task), small_data, name="s2")
    assert_bitwise_equal(model, saved)


def test_same_seed_same_scores_different_seed_different(tmp_path, trained_mlp, small_data):
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    a = _analyzer(tmp_path / "a", model, task, seed=1)
    b = _analyzer(tmp_path / "b", model, task, seed=1)
    c = _analyzer(tmp_path / "c", model, task, seed=2)
    for an in (a, b, c):
        _score(an, small_data)
    sa, sb, sc = (an.load_pairwise_scores("s")["all_modules"] for an in (a, b, c))
    assert torch.equal(sa, sb)
    assert not torch.equal(sa, sc)
