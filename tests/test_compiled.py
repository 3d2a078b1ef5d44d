"""`BIFArguments.compile_evaluation`: the evaluation views through `torch.compile`, with a fallback to eager.

The default run traces the views with dynamo and hands its graphs to a counting backend that runs them as they
are: the same torch ops as the eager views in the same order, so the scores are bitwise the eager ones (measured
for the per-example-method, vmap and per-token views). That checks the wiring in seconds: every side's view is
compiled, once per batch shape and not once per draw (the sampler's in-place weight updates reach the graph as
inputs, not as baked constants), per-token views included. The inductor run, whose kernels round differently, is
`slow` (its first compilation alone takes 15-20 s on 2 cores) and bounded by 1e-5 of the largest score as in
test_lockstep (measured 8e-7 on the UCI MLP).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

import pytest
import torch
from conftest import PIN_ARGS, PlainRegressionTask, state_copy
from test_lockstep import close
from test_per_token import ARGS as TOKEN_ARGS
from test_per_token import Bigram, TokenData, TokenTask

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, ScoreArguments, compiled, logs, prepare_model


@pytest.fixture()
def graphs(monkeypatch) -> List[Any]:
    """The graphs dynamo hands to the backend, which runs each as traced."""
    seen: List[Any] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: List[Any]) -> Callable:
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()  # earlier tests' cache entries count towards dynamo's recompile limit
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", backend)
    yield seen
    torch._dynamo.reset()


def _scores(tmp_path, model, task, data, compile_evaluation: bool, score_args=None, **bif) -> torch.Tensor:
    train, query = data
    args = BIFArguments(compile_evaluation=compile_evaluation, **{**PIN_ARGS, **bif})
    analyzer = Analyzer("c", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "pw",
        "f",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=4,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("pw")["all_modules"]


@pytest.mark.parametrize("task", [RegressionTask(), PlainRegressionTask()], ids=["per-example method", "vmap"])
def test_compiled_views_give_the_eager_scores_with_one_graph_per_batch_shape(
    task, tmp_path, trained_mlp, small_data, graphs
):
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    eager = _scores(tmp_path / "eager", model, task, small_data, False)
    assert not graphs
    together = _scores(tmp_path / "compiled", model, task, small_data, True)
    assert torch.equal(together, eager)
    # one graph per view and batch shape (train batches, query batches of 4 and their tail): a few, where weights
    # baked in as constants would need one per draw (2 x 24)
    assert 2 <= len(graphs) <= 6
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_per_token_views_compile(tmp_path, graphs):
    data = TokenData(24, seed=0), TokenData(4, seed=1)
    task = TokenTask()
    model = prepare_model(Bigram(), task)
    per_token = ScoreArguments(compute_per_token_scores=True)
    eager = _scores(tmp_path / "eager", model, task, data, False, per_token, **TOKEN_ARGS)
    together = _scores(tmp_path / "compiled", model, task, data, True, per_token, **TOKEN_ARGS)
    assert eager.dim() == 3
    assert torch.equal(together, eager)
    assert graphs


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(
    tmp_path, trained_mlp, small_data, monkeypatch, caplog
):
    calls: Dict[str, int] = {"backend": 0}

    def broken(gm, example_inputs):
        calls["backend"] += 1
        raise RuntimeError("no C++ compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", broken)
    monkeypatch.setattr(logs, "_warned", set())  # each view warns once per process: this test must see it
    task = RegressionTask()
    model = prepare_model(trained_mlp, task)
    eager = _scores(tmp_path / "eager", model, task, small_data, False)
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        fallback = _scores(tmp_path / "fallback", model, task, small_data, True)
    torch._dynamo.reset()
    assert torch.equal(fallback, eager)  # the eager views, bitwise
    warnings = [r.getMessage() for r in caplog.records if "compile_evaluation" in r.getMessage()]
    assert warnings and all("no C++ compiler here" in w for w in warnings)
    assert len(warnings) <= 2  # one per side's view, then eager for the rest of the run
    assert calls["backend"] == len(warnings)


def test_a_view_error_is_raised_as_without_the_option(tmp_path, trained_mlp, small_data, graphs):
    class Broken(RegressionTask):
        def compute_per_example_measurement(self, batch, model):
            raise ValueError("the measurement's own error")

    task = Broken()
    model = prepare_model(trained_mlp, task)
    with pytest.raises(Exception, match="the measurement's own error"):
        _scores(tmp_path, model, task, small_data, True)


def test_compile_evaluation_must_be_a_bool():
    with pytest.raises(ValueError, match="compile_evaluation must be True or False"):
        BIFArguments(compile_evaluation="yes")


@pytest.mark.slow
def test_inductor_compiled_scores_agree_with_eager(tmp_path, trained_mlp, small_data, caplog):
    """Inductor's fused kernels round differently from eager (measured 8e-7 relative on the UCI MLP)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    task = RegressionTask()
    model = prepare_model(trained_mlp, task)
    eager = _scores(tmp_path / "eager", model, task, small_data, False)
    with caplog.at_level(logging.WARNING, logger="kronfluence_bif"):
        inductor = _scores(tmp_path / "inductor", model, task, small_data, True)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not [r for r in caplog.records if "compile_evaluation" in r.getMessage()]  # no fallback to eager
    assert graphs >= 2
    assert close(inductor, eager)
