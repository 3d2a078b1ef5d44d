"""The SGLD-CV control variate (`engine.gradients.StepGradient`): the closed form on least squares, zero noise at
w*, the chain's weights restored, the noise it removes on a network, and where the engine uses it."""

from __future__ import annotations

from typing import List

import pytest
import torch
from conftest import PIN_ARGS, PlainRegressionTask
from torch import nn

import kronfluence_bif.engine.engine as engine_module
from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.engine.gradients import StepGradient
from kronfluence_bif.loss_views import LossViews
from kronfluence_bif.parameters import SampledWeights

F64 = torch.float64


class FullGradient:
    """The one thing StepGradient asks of the sampler context: the mean train-loss gradient at w*."""

    def __init__(self, model: nn.Module, task, batch) -> None:
        loss = task.compute_train_loss(batch, model) / len(batch[0])
        self.mean = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]

    def anchor_gradient(self) -> List[torch.Tensor]:
        return self.mean


def _least_squares(n=40, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, 1, generator=gen, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 0.3)  # not the minimum: grad L(w*) != 0
    return model, x, y


def test_closed_form_on_least_squares_and_no_noise_at_w_star():
    model, x, y = _least_squares()
    task = RegressionTask()
    context = FullGradient(model, task, (x, y))
    w_star = model.weight.detach().clone()
    with SampledWeights(model, list(model.named_parameters())) as weights:
        gradient = StepGradient(model, LossViews(task), weights, context, control_variate=True)
        rows = [torch.randperm(40, generator=torch.Generator().manual_seed(s))[:8] for s in range(5)]
        for r in rows:  # at w* every minibatch gives m grad L(w*): the estimate has no noise there
            _, grads = gradient((x[r], y[r]), 8)
            torch.testing.assert_close(grads[0], 8 * context.mean[0], rtol=1e-12, atol=1e-12)
        delta = 0.1 * torch.randn(w_star.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
        with torch.no_grad():
            weights.params[0].copy_(w_star + delta)
        moved = weights.params[0].detach().clone()
        for r in rows:  # sum_B [g_i(w) - g_i(w*)] + m grad L(w*) = 2 X_B^T X_B (w - w*) + m grad L(w*)
            loss, grads = gradient((x[r], y[r]), 8)
            expected = 2 * delta @ x[r].T @ x[r] + 8 * context.mean[0]
            torch.testing.assert_close(grads[0], expected, rtol=1e-10, atol=1e-10)
            assert torch.equal(weights.params[0], moved)  # the chain's weights are back, bitwise
            assert float(loss) == pytest.approx(float(((x[r] @ moved.T - y[r]) ** 2).sum()), rel=1e-12)


def test_weights_are_restored_when_the_gradient_at_w_star_fails():
    model, x, y = _least_squares()
    task = RegressionTask()
    context = FullGradient(model, task, (x, y))
    with SampledWeights(model, list(model.named_parameters())) as weights:
        gradient = StepGradient(model, LossViews(task), weights, context, control_variate=True)
        with torch.no_grad():
            weights.params[0].add_(1.0)
        moved = weights.params[0].detach().clone()
        calls = []
        real = gradient._gradient

        def second_fails(batch):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("at w*")
            return real(batch)

        gradient._gradient = second_fails
        with pytest.raises(RuntimeError, match="at w"):
            gradient((x[:8], y[:8]), 8)
        assert torch.equal(weights.params[0], moved)


def test_it_removes_the_minibatch_noise_near_w_star(trained_mlp, small_data):
    """Over random minibatches near w* the plain estimate scatters like the per-example gradients; the control
    variate's like g_i(w) - g_i(w*) ~ H_i (w - w*): at a move of 1e-3 of the weights' scale, orders less."""
    train, _ = small_data
    x, y = train.tensors
    task = RegressionTask()
    model = trained_mlp
    context = FullGradient(model, task, (x, y))
    gen = torch.Generator().manual_seed(0)
    with SampledWeights(model, list(model.named_parameters())) as weights:
        with torch.no_grad():
            for p in weights.params:
                p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        spread = {}
        for cv in (False, True):
            gradient = StepGradient(model, LossViews(task), weights, context, control_variate=cv)
            draws = []
            for s in range(30):
                r = torch.randperm(48, generator=torch.Generator().manual_seed(s))[:8]
                draws.append(torch.cat([g.reshape(-1) for g in gradient((x[r], y[r]), 8)[1]]))
            spread[cv] = torch.stack(draws).var(0).sum()
    assert spread[True] < 1e-3 * spread[False]


@pytest.mark.parametrize(("batch_size", "used"), [(8, True), (None, False)])
def test_the_engine_uses_it_with_minibatches_only(batch_size, used, tmp_path, trained_mlp, small_data, monkeypatch):
    seen = []
    real = engine_module.StepGradient.__init__

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.control_variate)

    monkeypatch.setattr(engine_module.StepGradient, "__init__", record)
    task = PlainRegressionTask()
    train, query = small_data
    analyzer = Analyzer(
        "cv", prepare_model(trained_mlp, task), task, cpu=True, output_dir=str(tmp_path), strategy="bif"
    )
    fields = {**PIN_ARGS, "sampler": "subspace_sgld", "sketch_rank": 8, "sampler_batch_size": batch_size}
    args = BIFArguments(**fields)
    assert args.control_variate is True  # subspace_sgld's default
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5)
    assert seen and set(seen) == {used}
    assert BIFArguments(**{**PIN_ARGS, "sampler": "sgld"}).control_variate is False


def test_a_non_bool_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="BIFArguments.control_variate must be None"):
        BIFArguments(control_variate="yes")
