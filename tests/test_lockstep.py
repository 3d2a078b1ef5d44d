"""Chains in lockstep (`engine/lockstep.py`): the same scores as one chain at a time, to float32 rounding.

A lockstep chain is the same chain as alone (its own sampler, noise and minibatch streams); only the batched
products round differently, a few float32 ulps per step (~1e-7 relative), which the chains carry into the scores:
measured 2e-7 (sgld) to 1.2e-6 (rmsprop_sgld) relative to the largest score. The tests allow 1e-5. Where lockstep
does not apply (a model vmap cannot batch, resumed chains) the chains run as `Chain`, bitwise as before.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import pytest
import torch
from conftest import PIN_ARGS, PlainRegressionTask, fit, make_mlp, state_copy
from test_per_token import ARGS as TOKEN_ARGS
from test_per_token import TokenData, TokenTask, trained_bigram
from test_resume import ARGS as RESUME_ARGS
from test_resume import Interrupt, _interrupt_after_saves
from torch import nn

from kronfluence_bif import Analyzer, BIFArguments, ScoreArguments, prepare_model, storage
from kronfluence_bif.engine import lockstep

MODES = ("together", "alone")
RTOL = 1e-5  # relative to the largest score: float32 rounding carried by the chains (measured <= 1.2e-6)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.double().abs().max().clamp_min(1e-30)
    return a.shape == b.shape and float((a.double() - b.double()).abs().max() / scale) < RTOL


@pytest.fixture()
def calls(monkeypatch) -> Dict[str, List[Any]]:
    """Records each lockstep run's chains and each probe's answer."""
    seen: Dict[str, List[Any]] = {"lockstep": [], "probe": []}
    real_init, real_probe = lockstep.Lockstep.__init__, lockstep.probe

    def init(self, engine, run, chains):
        seen["lockstep"].append(list(chains))
        real_init(self, engine, run, chains)

    def probe(engine) -> Optional[str]:
        seen["probe"].append(real_probe(engine))
        return seen["probe"][-1]

    monkeypatch.setattr(lockstep.Lockstep, "__init__", init)
    monkeypatch.setattr(lockstep, "probe", probe)
    return seen


def _run(tmp_path, model, task, data, batch_chains, self_scores=True, **bif) -> List[torch.Tensor]:
    train, query = data
    args = BIFArguments(batch_chains=batch_chains, **{**PIN_ARGS, **bif})
    analyzer = Analyzer("l", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args, overwrite_output_dir=True)
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=4, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("pw", "f", **kw)
    out = [analyzer.load_pairwise_scores("pw")["all_modules"]]
    if self_scores:
        analyzer.compute_self_scores("self", "f", train_dataset=train, per_device_train_batch_size=16)
        out.append(analyzer.load_self_scores("self")["all_modules"])
    return out


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sketch_sgld", "subspace_sgld", "subspace_full_batch"])
def test_lockstep_equals_one_chain_at_a_time(sampler, tmp_path, trained_mlp, small_data, calls, caplog):
    """subspace_full_batch: the full-batch gradient, so the linear control variate applies (its span coordinates
    recorded per lane)."""
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    extra = {"sketch_rank": 8, "step_size": 0.05} if sampler == "sketch_sgld" else {}
    extra.update({"sketch_rank": 8} if sampler.startswith("subspace") else {})
    if sampler == "subspace_full_batch":
        sampler, extra["sampler_batch_size"] = "subspace_sgld", len(small_data[0])
    extra["sampler"] = sampler
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        together = _run(tmp_path / "together", model, task, small_data, True, **extra)
    controlled = "linear_control_variate: the values' linear part" in caplog.text
    assert controlled == ("sampler_batch_size" in extra)
    assert len(calls["lockstep"]) == 2
    alone = _run(tmp_path / "alone", model, task, small_data, False, **extra)
    assert calls["lockstep"] == [[0, 1], [0, 1]] and calls["probe"] == [None, None]  # pairwise, then self only
    for a, b in zip(together, alone):
        assert close(a, b) and not torch.equal(a, torch.zeros_like(a))
    traces = [storage.load_tensors(tmp_path / m / "l" / "scores_pw" / storage.BIF_TRACES_FILE) for m in MODES]
    for name, value in traces[1].items():  # the same draws traced (NaN elsewhere), the same values to rounding
        assert torch.equal(value.isnan(), traces[0][name].isnan()), name
        assert close(value.nan_to_num(), traces[0][name].nan_to_num()), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())  # the model is w* again


def test_the_default_on_cpu_runs_one_chain_at_a_time(tmp_path, trained_mlp, small_data, calls):
    task = PlainRegressionTask()
    _run(tmp_path, prepare_model(trained_mlp, task), task, small_data, None, self_scores=False)
    assert calls["lockstep"] == [] and calls["probe"] == []


def test_per_token_scores_in_lockstep(tmp_path, calls):
    train, query = TokenData(24, 0), TokenData(3, 1, prompt=3)
    task = TokenTask()
    model = prepare_model(trained_bigram(train, 100), task)
    out = {}
    for batch_chains in (False, True):
        folder = tmp_path / str(batch_chains)
        analyzer = Analyzer("t", model, task, cpu=True, output_dir=str(folder), disable_tqdm=True, strategy="bif")
        args = BIFArguments(**{**TOKEN_ARGS, "num_draws": 30}, batch_chains=batch_chains)
        analyzer.fit_all_factors("bif", train, bif_args=args)
        kw = dict(
            query_dataset=query, train_dataset=train, per_device_query_batch_size=2, per_device_train_batch_size=5
        )
        analyzer.compute_pairwise_scores("tok", "bif", score_args=ScoreArguments(compute_per_token_scores=True), **kw)
        full = storage.load_tensors(folder / "t" / "scores_tok" / storage.BIF_TOKEN_SCORES_FILE)["all_modules"]
        out[batch_chains] = (analyzer.load_pairwise_scores("tok")["all_modules"], full)
    assert calls["lockstep"] == [[0, 1]]
    for a, b in zip(out[True], out[False]):
        assert close(a, b)


class ItemGate(nn.Module):
    """A model vmap cannot batch over chains: its forward reads a weight-dependent value with `.item()`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out * 0.5 if out.abs().max().item() > 1e6 else out


class StaleAlias(nn.Module):
    """A model that reads its last layer's weight through an alias `functional_call` cannot swap."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net
        self.alias = [net[-1].weight]  # a plain list: not a parameter of this module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.net[:-1](x), self.alias[0], self.net[-1].bias)


@pytest.mark.parametrize("wrapper, reason", [(ItemGate, "Error"), (StaleAlias, "differ from the model's own")])
def test_models_vmap_cannot_batch_run_one_chain_at_a_time_bitwise(wrapper, reason, tmp_path, small_data, calls):
    train, _ = small_data
    task = PlainRegressionTask()
    model = prepare_model(wrapper(fit(make_mlp(), train)), task)
    alone = _run(tmp_path / "alone", model, task, small_data, False, self_scores=False)
    together = _run(tmp_path / "together", model, task, small_data, True, self_scores=False)
    assert calls["lockstep"] == [] and reason in calls["probe"][0]
    assert torch.equal(together[0], alone[0])


def _resume_scores(tmp_path, model, task, data, batch_chains: bool) -> torch.Tensor:
    train, query = data
    args = BIFArguments(**RESUME_ARGS, checkpoint_interval=16, batch_chains=batch_chains)
    analyzer = Analyzer("r", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5)
    return analyzer.load_pairwise_scores("s")["all_modules"]


def test_interrupted_lockstep_run_resumes_chain_by_chain(tmp_path, trained_mlp, small_data, calls):
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    reference = _resume_scores(tmp_path / "ref", model, task, small_data, True)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupt):
        written = _interrupt_after_saves(patch, saves=4)
        _resume_scores(tmp_path / "run", model, task, small_data, True)
    assert written == [(0, 16, False), (1, 16, False), (2, 16, False), (0, 32, False)]  # the chains save together
    assert calls["lockstep"] == [[0, 1, 2], [0, 1, 2]]
    calls["lockstep"].clear()
    resumed = _resume_scores(tmp_path / "run", model, task, small_data, True)
    assert calls["lockstep"] == []  # every chain resumes from its checkpoint, alone
    assert close(resumed, reference)


def test_fresh_chains_of_a_resumed_run_run_in_lockstep(tmp_path, trained_mlp, small_data, calls):
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    reference = _resume_scores(tmp_path / "ref", model, task, small_data, False)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupt):
        written = _interrupt_after_saves(patch, saves=3)  # chain 0 complete, chains 1 and 2 not started
        _resume_scores(tmp_path / "run", model, task, small_data, False)
    assert written[-1] == (0, 40, True)
    resumed = _resume_scores(tmp_path / "run", model, task, small_data, True)
    assert calls["lockstep"] == [[1, 2]]
    assert close(resumed, reference)


def test_batch_chains_is_validated():
    assert BIFArguments().batch_chains is False  # opt-in until a GPU measurement shows the gain
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ValueError, match="batch_chains"):
            BIFArguments(batch_chains=bad)
