"""Layout: a BIF scores folder has every file of kronfluence's, with the same keys, shapes, dtypes, metadata."""

import json

import kronfluence
import pytest
import torch
from conftest import PlainRegressionTask, fit, make_mlp, make_regression
from kronfluence import FactorArguments, ScoreArguments
from safetensors import safe_open

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model
from kronfluence_bif.storage import BIF_HEADER_KEY

FAST = BIFArguments(num_chains=2, num_draws=24, num_burnin_steps=10, sampler_batch_size=16, seed=7)

SCORE_CASES = {
    "default": ({}, {}),
    "indices": ({"query_indices": [0, 2, 5], "train_indices": list(range(10))}, {}),
    "agg_query": ({}, {"aggregate_query_gradients": True}),
    "agg_train": ({}, {"aggregate_train_gradients": True}),
    "partitioned": ({}, {"data_partitions": 2}),
    "f64": ({}, {"score_dtype": torch.float64}),
    "bf16": ({}, {"score_dtype": torch.bfloat16}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One analyzer holding EK-FAC and BIF factors side by side, scored with both (the A/B use)."""
    out = tmp_path_factory.mktemp("layout")
    train, query = make_regression(40, seed=0), make_regression(8, seed=1)
    task = RegressionTask()
    model = prepare_model(fit(make_mlp(), train, steps=200), task)
    analyzer = Analyzer("mlp", model, task, cpu=True, output_dir=str(out), disable_tqdm=True, bif_args=FAST)
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=20)
    analyzer.fit_all_factors("bif", dataset=train, factor_args=FactorArguments(strategy="bif"))
    for name, (kw, sa) in SCORE_CASES.items():
        for method in ("ekfac", "bif"):
            analyzer.compute_pairwise_scores(
                f"{method}_{name}",
                method,
                query_dataset=query,
                train_dataset=train,
                per_device_query_batch_size=4,
                per_device_train_batch_size=16,
                score_args=ScoreArguments(**sa),
                **kw,
            )
    for method in ("ekfac", "bif"):
        analyzer.compute_self_scores(f"{method}_self", method, train_dataset=train, per_device_train_batch_size=16)
        analyzer.compute_self_scores(
            f"{method}_self_measurement",
            method,
            train_dataset=train,
            per_device_train_batch_size=16,
            score_args=ScoreArguments(use_measurement_for_self_influence=True),
        )
    return analyzer, out / "mlp", train, query, model, task


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


@pytest.mark.parametrize("case", list(SCORE_CASES) + ["self", "self_measurement"])
def test_every_kronfluence_file_exists_with_same_keys_shapes_dtypes(runs, case):
    _, root, *_ = runs
    ek_dir, bif_dir = root / f"scores_ekfac_{case}", root / f"scores_bif_{case}"
    ek_files = sorted(p.name for p in ek_dir.iterdir())
    bif_files = sorted(p.name for p in bif_dir.iterdir())
    assert set(ek_files) <= set(bif_files), set(ek_files) - set(bif_files)
    extra = set(bif_files) - set(ek_files)
    assert extra <= {"bif_arguments.json", "bif_traces.safetensors", "bif_diagnostics.json"}, extra
    for name in ek_files:
        if name.endswith(".safetensors"):
            ek_meta, ek_t = _header(ek_dir / name)
            bif_meta, bif_t = _header(bif_dir / name)
            assert ek_t.keys() == bif_t.keys()
            for key in ek_t:
                assert ek_t[key].shape == bif_t[key].shape, (name, key)
                assert ek_t[key].dtype == bif_t[key].dtype, (name, key)
            assert len(ek_meta) == 17
            assert {k: bif_meta[k] for k in ek_meta} == ek_meta  # the 17 kronfluence keys, unchanged
            assert set(bif_meta) - set(ek_meta) == {BIF_HEADER_KEY}
            assert BIFArguments.from_dict(json.loads(bif_meta[BIF_HEADER_KEY])) == FAST
        elif name != "factor_arguments.json":
            assert (ek_dir / name).read_text() == (bif_dir / name).read_text(), name
    ek_fa = json.loads((ek_dir / "factor_arguments.json").read_text())
    bif_fa = json.loads((bif_dir / "factor_arguments.json").read_text())
    assert bif_fa == {**ek_fa, "strategy": "bif"}


@pytest.mark.parametrize("case", list(SCORE_CASES) + ["self"])
def test_stock_kronfluence_reads_bif_folders(runs, case):
    analyzer, root, train, query, model, task = runs
    stock = kronfluence.Analyzer("mlp", model, task, cpu=True, output_dir=str(root.parent), disable_tqdm=True)
    if case == "self":
        scores = stock.load_self_scores("bif_self")
    else:
        scores = stock.load_pairwise_scores(f"bif_{case}")
    assert scores is not None and torch.isfinite(scores["all_modules"].float()).all()
    assert stock.load_score_args(f"bif_{case}") == analyzer.load_score_args(f"ekfac_{case}")
    assert stock.load_factor_args("bif").strategy == "bif"


def test_scores_follow_kronfluence_semantics(runs):
    analyzer, *_ = runs
    stored = analyzer.load_pairwise_scores("bif_default")["all_modules"]
    assert stored.shape == (8, 40) and stored.dtype == torch.float32
    full = stored.double()
    sub = analyzer.load_pairwise_scores("bif_indices")["all_modules"].double()
    # same seeded chains: selecting rows/columns changes nothing but which examples are written
    torch.testing.assert_close(sub, full[[0, 2, 5]][:, :10], rtol=1e-4, atol=1e-7)
    agg_q = analyzer.load_pairwise_scores("bif_agg_query")["all_modules"].double()
    agg_t = analyzer.load_pairwise_scores("bif_agg_train")["all_modules"].double()
    tol = 1e-4 * full.abs().sum()
    assert agg_q.shape == (1, 40) and (agg_q[0] - full.sum(0)).abs().max() <= tol
    assert agg_t.shape == (8, 1) and (agg_t[:, 0] - full.sum(1)).abs().max() <= tol
    parted = analyzer.load_pairwise_scores("bif_partitioned")["all_modules"].double()
    torch.testing.assert_close(parted, full, rtol=1e-4, atol=1e-7)
    f64 = analyzer.load_pairwise_scores("bif_f64")["all_modules"]
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), full.float(), rtol=1e-4, atol=1e-6)
    assert analyzer.load_pairwise_scores("bif_bf16")["all_modules"].dtype == torch.bfloat16


def test_self_scores_are_variances_and_measurement_covariances(runs):
    analyzer, *_ = runs
    var = analyzer.load_self_scores("bif_self")["all_modules"]
    assert var.shape == (40,) and (var >= 0).all()
    # RegressionTask's measurement is its loss: Cov(measurement_i, loss_i) = Var(loss_i)
    meas = analyzer.load_self_scores("bif_self_measurement")["all_modules"]
    torch.testing.assert_close(meas, var, rtol=1e-5, atol=1e-8)


def test_partition_files_aggregate_with_kronfluence_itself(runs):
    analyzer, root, train, query, model, task = runs
    folder = root / "scores_bif_partitioned"
    merged = analyzer.load_pairwise_scores("bif_partitioned")["all_modules"]
    (folder / "pairwise_scores.safetensors").unlink()
    stock = kronfluence.Analyzer("mlp", model, task, cpu=True, output_dir=str(root.parent), disable_tqdm=True)
    stock.aggregate_pairwise_scores("bif_partitioned")
    assert torch.equal(stock.load_pairwise_scores("bif_partitioned")["all_modules"], merged)


def test_separate_partition_jobs_equal_one_job(runs, tmp_path):
    analyzer, root, train, query, model, task = runs
    kw = dict(
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=4,
        per_device_train_batch_size=16,
        score_args=ScoreArguments(data_partitions=2),
    )
    analyzer.compute_pairwise_scores("jobs", "bif", target_data_partitions=[1], **kw)
    assert analyzer.load_pairwise_scores("jobs") is None  # partition 0 not computed yet: nothing aggregated
    analyzer.compute_pairwise_scores("jobs", "bif", target_data_partitions=[0], **kw)
    full = analyzer.load_pairwise_scores("bif_default")["all_modules"]
    torch.testing.assert_close(analyzer.load_pairwise_scores("jobs")["all_modules"], full, rtol=1e-4, atol=1e-7)


def test_skip_mismatch_and_overwrite(runs):
    analyzer, root, train, query, *_ = runs
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=4, per_device_train_batch_size=16)
    again = analyzer.compute_pairwise_scores("bif_default", "bif", **kw)  # exists: skipped, loaded
    assert torch.equal(again["all_modules"], analyzer.load_pairwise_scores("bif_default")["all_modules"])
    # as in kronfluence, an existing result is returned whatever the arguments; without a result, different
    # arguments than the recorded ones raise
    (root / "scores_bif_f64" / "pairwise_scores.safetensors").unlink()
    with pytest.raises(ValueError, match="overwrite_output_dir=True"):
        analyzer.compute_pairwise_scores(
            "bif_f64", "bif", score_args=ScoreArguments(score_dtype=torch.float16), overwrite_output_dir=False, **kw
        )
    with pytest.raises(ValueError, match="overwrite_output_dir=True"):
        analyzer.fit_all_factors(
            "bif", dataset=train, factor_args=FactorArguments(strategy="bif"), bif_args=BIFArguments(num_draws=3)
        )
    analyzer.compute_pairwise_scores(
        "bif_f64", "bif", score_args=ScoreArguments(score_dtype=torch.float16), overwrite_output_dir=True, **kw
    )
    assert analyzer.load_pairwise_scores("bif_f64")["all_modules"].dtype == torch.float16


def test_kronfluence_strategies_unchanged_and_bif_via_analyzer_flag(tmp_path, small_data):
    train, query = small_data
    task = PlainRegressionTask()
    model = prepare_model(fit(make_mlp(), train, steps=100), task)
    analyzer = Analyzer("a", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="kfac")
    analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=16)
    assert analyzer.load_factor_args("f").strategy == "kfac"
    assert (tmp_path / "a" / "factors_f" / "activation_eigenvectors.safetensors").exists()
    bif = Analyzer(
        "b", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=FAST
    )
    bif.fit_all_factors("f", dataset=train)
    assert sorted(p.name for p in (tmp_path / "b" / "factors_f").iterdir()) == [
        "bif_arguments.json",
        "factor_arguments.json",
    ]
    assert bif.load_bif_args("f") == FAST
    assert (
        bif.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5)
        is None
    )  # kronfluence returns None when fresh
    assert bif.load_pairwise_scores("s")["all_modules"].shape == (len(query), len(train))
