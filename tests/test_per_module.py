"""Per-module BIF scores (the weight-restricted posterior of each tracked module) and module partitions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import PlainRegressionTask, fit, make_mlp, make_regression
from kronfluence.analyzer import Analyzer as KronfluenceAnalyzer

from kronfluence_bif import Analyzer, BIFArguments, ScoreArguments, prepare_model
from kronfluence_bif.cli import format_diagnostics

SHORT = BIFArguments(sampler="sgld", num_chains=2, num_draws=16, num_burnin_steps=8, step_size=1e-4, nbeta=100.0)
MODULES = ["0", "2", "4"]  # kronfluence's tracked Linear layers of make_mlp, its per-module score keys


@pytest.fixture()
def setting(tmp_path):
    train, query = make_regression(24, seed=0), make_regression(5, seed=1)
    task = PlainRegressionTask()
    model = prepare_model(fit(make_mlp(), train, steps=100), task)
    analyzer = Analyzer("pm", model, task, strategy="bif", bif_args=SHORT, output_dir=str(tmp_path), cpu=True)
    analyzer.fit_all_factors("bif", dataset=train)
    for module in MODULES:  # the reference: all-modules runs restricted to one module's weights
        analyzer.fit_all_factors(
            module, dataset=train, bif_args=dataclasses.replace(SHORT, sampled_modules=[f"{module}.*"])
        )
    return analyzer, train, query, tmp_path


def pairwise(analyzer, name, factors, train, query, **kwargs):
    analyzer.compute_pairwise_scores(
        name, factors, query_dataset=query, train_dataset=train, per_device_query_batch_size=5, **kwargs
    )
    return analyzer.load_pairwise_scores(name)


def test_per_module_scores_are_each_modules_restricted_posterior(setting):
    analyzer, train, query, tmp_path = setting
    scores = pairwise(analyzer, "pm", "bif", train, query, score_args=ScoreArguments(compute_per_module_scores=True))
    assert list(scores) == MODULES and all(s.shape == (5, 24) for s in scores.values())
    for module in MODULES:
        restricted = pairwise(analyzer, f"only{module}", module, train, query)["all_modules"]
        assert torch.equal(scores[module], restricted), module  # the same seeded chains over the same weights
    every = pairwise(analyzer, "all", "bif", train, query)["all_modules"]
    assert not torch.allclose(sum(scores.values()), every, rtol=0.05)  # they do not add up (documented)
    stock = KronfluenceAnalyzer("pm", analyzer.model, analyzer.task, output_dir=str(tmp_path), cpu=True)
    assert list(stock.load_pairwise_scores("pm")) == MODULES  # kronfluence reads the per-module keys
    report = json.loads((analyzer.output_dir / "scores_pm" / "bif_diagnostics.json").read_text())
    assert report["modules"] == MODULES and [c["module"] for c in report["chains"]] == [
        m for m in MODULES for _ in "ab"
    ]
    traces = KronfluenceAnalyzer.load_file(analyzer.output_dir / "scores_pm" / "bif_traces.safetensors")
    assert {"0/mean_train_loss", "4/distance_from_w_star"} <= set(traces)
    assert "module" in format_diagnostics(analyzer.output_dir / "scores_pm")
    self_scores = analyzer.compute_self_scores(
        "spm", "bif", train_dataset=train, score_args=ScoreArguments(compute_per_module_scores=True)
    )
    assert self_scores is None and list(analyzer.load_self_scores("spm")) == MODULES


def test_module_partitions_split_modules_over_jobs_and_aggregate_as_kronfluence(setting):
    analyzer, train, query, _ = setting
    whole = pairwise(analyzer, "pm", "bif", train, query, score_args=ScoreArguments(compute_per_module_scores=True))
    split = ScoreArguments(compute_per_module_scores=True, module_partitions=2, data_partitions=2)
    for target in ([0], [1]):  # two jobs, one module partition each
        pairwise(analyzer, "split", "bif", train, query, score_args=split, target_module_partitions=target)
    folder = analyzer.output_dir / "scores_split"
    names = sorted(p.name for p in folder.glob("pairwise_scores_data_partition*"))
    assert len(names) == 4
    assert set(KronfluenceAnalyzer.load_file(folder / names[0])) == {"0", "2"}  # kronfluence's split: [0, 2], [4]
    merged = analyzer.load_pairwise_scores("split")
    assert list(merged) == MODULES
    for module in MODULES:
        assert torch.equal(merged[module], whole[module])


@pytest.mark.parametrize("aggregate", [False, True])
def test_module_partitions_of_all_modules_scores_equal_the_unpartitioned_scores(setting, aggregate):
    # an all-modules posterior does not split over modules: each module job scores a share of the examples instead
    analyzer, train, query, _ = setting
    whole = pairwise(analyzer, "w", "bif", train, query, score_args=ScoreArguments(aggregate_train_gradients=aggregate))
    split = ScoreArguments(module_partitions=3, data_partitions=2, aggregate_train_gradients=aggregate)
    parts = pairwise(analyzer, "mp", "bif", train, query, score_args=split)
    assert list(parts) == ["all_modules"] and parts["all_modules"].shape == whole["all_modules"].shape
    scale = whole["all_modules"].abs().max()
    torch.testing.assert_close(parts["all_modules"], whole["all_modules"], rtol=1e-5, atol=1e-6 * float(scale))
    one_job = KronfluenceAnalyzer.load_file(
        analyzer.output_dir / "scores_mp" / "pairwise_scores_data_partition1_module_partition2.safetensors"
    )
    if not aggregate:  # data partition 1 holds examples 12-23; module partition 2 scores its last third
        assert one_job["all_modules"].shape == (5, 12) and one_job["all_modules"][:, :8].abs().max() == 0
        assert one_job["all_modules"][:, 8:].abs().min() > 0


def test_profile_writes_the_sampling_phase_summary(tmp_path):
    train, query = make_regression(16, seed=0), make_regression(4, seed=1)
    task = PlainRegressionTask()
    model = prepare_model(make_mlp(), task)
    analyzer = Analyzer("prof", model, task, strategy="bif", bif_args=SHORT, output_dir=str(tmp_path), profile=True)
    analyzer.fit_all_factors("bif", dataset=train)
    pairwise(analyzer, "p", "bif", train, query)
    files = list((tmp_path / "prof" / "profiler_output").glob("scores_p_pairwise_summary_rank_0_*.txt"))
    assert len(files) == 1
    text = files[0].read_text()
    assert "Sample BIF Pairwise Scores" in text and "Save BIF Pairwise Scores" in text
