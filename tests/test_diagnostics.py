"""Sampler diagnostics: ESS, R-hat and sharpness against closed forms; runs that must be flagged are flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PlainRegressionTask, fit, make_mlp, make_regression

from kronfluence_bif import Analyzer, BIFArguments, prepare_model, storage
from kronfluence_bif.cli import main as cli
from kronfluence_bif.diagnostics import (
    LOSS_PRECISION_MESSAGE,
    effective_sample_size,
    float32_rounded,
    pair_means,
    preconditioned_sharpness,
    split_rhat,
    summarize,
)
from kronfluence_bif.engine import STEP_TRACES, SamplingResult, traced_draws
from kronfluence_bif.scoring import BIFScorer
from kronfluence_bif.tasks import precise_cross_entropy


def _ar1(phi: float, n: int, chains: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((chains, n))
    noise = rng.standard_normal((chains, n))
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def test_ess_matches_ar1_closed_form():
    # ESS of AR(1) = N (1 - phi) / (1 + phi). Averaged over 20 chains of 4000 draws the estimator's spread is a
    # few percent; 15% covers it with margin and still rejects an ESS that ignores autocorrelation (x19 at 0.9).
    for phi in (0.0, 0.5, 0.9):
        chains = _ar1(phi, 4000, 20)
        ess = np.mean([effective_sample_size(c) for c in chains])
        expected = 4000 * (1 - phi) / (1 + phi)
        assert abs(ess / expected - 1) < 0.15, (phi, ess, expected)
    assert np.isnan(effective_sample_size(np.ones(50)))


def test_split_rhat_detects_disagreeing_chains():
    mixed = _ar1(0.5, 1000, 4)
    assert split_rhat(mixed) < 1.02
    shifted = mixed + np.arange(4)[:, None] * 2.0  # chains around different means
    assert split_rhat(shifted) > 1.5
    drifting = mixed + np.linspace(0, 6, 1000)[None, :]  # one chain split in halves disagrees with itself
    assert split_rhat(drifting[:1]) > 1.5


def test_rhat_of_antithetic_pairs_compares_the_pairs():
    """Mirrored pairs share their even traces: R-hat over the pairs' means, not over near-duplicate chains."""
    pairs = _ar1(0.5, 1000, 2) + np.arange(2)[:, None] * 0.15  # two pairs whose means disagree a little
    duplicated = np.repeat(pairs, 2, axis=0)  # chains 0, 1 the first pair, 2, 3 the second
    assert np.array_equal(pair_means(duplicated, True), pairs)
    assert np.array_equal(pair_means(duplicated, False), duplicated)
    odd = np.concatenate([duplicated, pairs[:1]])  # a fifth chain without a partner stays itself
    assert np.array_equal(pair_means(odd, True), np.concatenate([pairs, pairs[:1]]))
    # counted as four chains the duplicates understate the between-chain variance (factor 2/3 in expectation)
    assert split_rhat(pair_means(duplicated, True)) > split_rhat(duplicated)
    traces = {"mean_train_loss": torch.from_numpy(duplicated)}
    for antithetic in (True, False):
        args = BIFArguments(sampler="subspace_sgld", antithetic_chains=antithetic)
        expected = split_rhat(pair_means(duplicated, antithetic))
        assert summarize(traces, [], args)["rhat_mean_train_loss"] == pytest.approx(expected, rel=1e-12)


def test_preconditioned_sharpness_of_a_quadratic():
    # loss(w) = sum_k (x_k . w - y_k)^2: Hessian 2 X^T X; with G, lambda_max(G^1/2 (s 2 X^T X + gamma) G^1/2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, generator=g)
    w = torch.zeros(5, requires_grad=True)
    precond = [torch.rand(5, generator=g) + 0.5]
    scale, gamma = 3.0, 7.0
    value = preconditioned_sharpness(
        lambda: ((x @ w - y) ** 2).sum(), [w], scale, gamma, precond, iterations=200, generator=g, tolerance=0.0
    )
    root = precond[0].sqrt().double()
    matrix = root[:, None] * (scale * 2 * x.T.double() @ x.double() + gamma * torch.eye(5)) * root[None, :]
    exact = float(torch.linalg.eigvalsh(matrix).max())
    assert value == pytest.approx(exact, rel=1e-4)
    # the default stops once the top Ritz pair's residual bounds its error by 1e-3 of itself: a Ritz value, from
    # below (G^1/2 applied twice per Lanczos step, counted)
    calls = []

    def apply_root(v):
        calls.append(1)
        return torch._foreach_mul(v, [precond[0].sqrt()])

    early = preconditioned_sharpness(
        lambda: ((x @ w - y) ** 2).sum(), [w], scale, gamma, apply_root, generator=torch.Generator().manual_seed(1)
    )
    assert len(calls) < 2 * 20  # stopped before the last iteration
    assert exact * 0.995 <= early <= exact * (1 + 1e-6)


def test_sharpness_is_exact_when_the_localization_dominates():
    """A shift gamma much larger than the curvature's spread (the demo UCI MLP under plain SGLD: nbeta 100,
    localization 1e3, top curvature term 1.4e3) does not slow Lanczos, whose Krylov space ignores it; power
    iteration converged at (gamma + s lambda_2) / (gamma + s lambda_1) there and stopped at 1001 against 2374."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=g) * torch.logspace(0, -2, 40)  # a spread of curvatures
    w = torch.zeros(40, requires_grad=True)
    scale, gamma = 20.0, 1000.0
    exact = float(torch.linalg.eigvalsh(scale * 2 * x.T.double() @ x.double()).max()) + gamma
    value = preconditioned_sharpness(lambda: ((x @ w) ** 2).sum(), [w], scale, gamma, None, generator=g)
    assert exact * (1 - 1e-3) <= value <= exact * (1 + 1e-9)
    assert value - gamma > 0.5 * (exact - gamma)  # the curvature term itself, not just the shift


def _run(tmp_path, model, **bif):
    train = torch.utils.data.TensorDataset(*_data(48, 0))
    query = torch.utils.data.TensorDataset(*_data(6, 1))
    task = PlainRegressionTask()
    model = prepare_model(model, task)
    bif = {"num_chains": 2, "num_draws": 60, "num_burnin_steps": 10, "sampler_batch_size": 16, **bif}
    args = BIFArguments(**bif)
    analyzer = Analyzer("d", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", train, bif_args=args)
    analyzer.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=6)
    folder = tmp_path / "d" / "scores_s"
    return folder, storage.load_json(folder / storage.BIF_DIAGNOSTICS_FILE)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.tanh(x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g)


def _trained():
    model = make_mlp()
    x, y = _data(48, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _reject(constant: str):
    raise AssertionError(f"{constant} in JSON")


def _codes(report):
    return {w["code"] for w in report["warnings"]}


def test_healthy_run_has_no_warnings_and_records_everything(tmp_path):
    folder, report = _run(
        tmp_path,
        _trained(),
        sampler="sgld",
        step_size=1e-3,
        nbeta=100.0,
        localization=100.0,
        num_burnin_steps=200,
        num_draws=400,
    )
    assert _codes(report) <= {"slow_mixing"}, report["warnings"]
    assert report["rhat_mean_train_loss"] < 1.1
    assert 0 < report["sharpness"]["step_size_times_lambda_max"] < 1
    assert {c["chain"] for c in report["chains"]} == {0, 1}
    traces = storage.load_tensors(folder / storage.BIF_TRACES_FILE)
    taken = traced_draws(BIFArguments(num_draws=400))  # every STEP_TRACE_INTERVAL-th draw and the last
    assert int(taken.sum()) == 51 and bool(taken[-1])
    for name in ("gradient_step_norm", "localization_step_norm", "noise_step_norm", "distance_from_w_star"):
        assert traces[name].shape == (2, 400) and bool((traces[name][:, taken] > 0).all()), name
        assert bool(traces[name][:, ~taken].isnan().all()), name
    # noise step = sqrt(eps) |xi| with |xi| ~ sqrt(d): a closed form for plain SGLD
    d = sum(p.numel() for p in make_mlp().parameters())
    assert float(traces["noise_step_norm"][:, taken].mean()) == pytest.approx((1e-3 * d) ** 0.5, rel=0.05)


def test_exploding_chain_is_flagged(tmp_path):
    # step_size x lambda_max ~ 6 (lambda_max ~ 714 for this model at nbeta=100, gamma=100, measured with
    # preconditioned_sharpness): past SGLD's stability limit of 4 the loss grows about e-fold per step. After 30
    # steps it is ~1e10: far above 10x the thermal scale, still finite, and below the (raised) error limit.
    _, report = _run(
        tmp_path,
        _trained(),
        sampler="sgld",
        step_size=8.4e-3,
        nbeta=100.0,
        localization=100.0,
        num_draws=20,
        sampler_batch_size=48,
        divergence_loss_ratio=1e30,
    )
    assert {"exploding", "sharpness"} <= _codes(report), report["warnings"]


def test_summarize_flags_synthetic_failure_modes():
    args = BIFArguments(sampler="rmsprop_sgld")
    rising = torch.linspace(1.0, 50.0, 100, dtype=torch.float64)
    falling = torch.linspace(1.0, 0.5, 100, dtype=torch.float64)
    flat = torch.full((100,), 1.0, dtype=torch.float64)
    traces = {"mean_train_loss": torch.stack([rising, falling, flat])}
    chains = [{"chain": c, "initial_mean_loss": 1.0, "loss_scale": 1.0} for c in range(3)]
    report = summarize(traces, chains, args, sharpness=5.0 / args.step_size)
    by_chain = {(w["code"], w["chain"]) for w in report["warnings"]}
    assert {("exploding", 0), ("training", 1), ("flat", 2), ("sharpness", None), ("rhat", None)} <= by_chain
    assert "beyond its stability limit" in next(w["message"] for w in report["warnings"] if w["code"] == "sharpness")


def test_frozen_chain_is_flagged(tmp_path):
    _, report = _run(tmp_path, _trained(), sampler="sgld", step_size=1e-14, nbeta=100.0, localization=100.0)
    assert "flat" in _codes(report)


def test_training_chain_and_sharpness_are_flagged(tmp_path):
    # an untrained model: SGLD at high nbeta walks downhill (and the tempered loss is sharp for this step)
    _, report = _run(tmp_path, make_mlp(), sampler="sgld", step_size=1.5e-4, nbeta=2000.0, localization=1.0)
    assert {"training", "sharpness"} <= _codes(report), report["warnings"]


def test_cli_diagnose_prints_warnings_plots_and_strict_exit(tmp_path, capsys):
    folder, _ = _run(tmp_path, _trained(), sampler="sgld", step_size=1e-14, nbeta=100.0, localization=100.0)
    png = tmp_path / "traces.png"
    assert cli(["diagnose", str(folder), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "[flat]" in out and "R-hat" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["diagnose", str(folder), "--strict"]) == 1
    json.loads((folder / storage.BIF_DIAGNOSTICS_FILE).read_text(), parse_constant=_reject)  # strict JSON


def test_undefined_statistics_are_written_as_null(tmp_path):
    """Exactly constant traces have no ESS or R-hat: the file says null, never the non-JSON NaN."""
    traces = {"mean_train_loss": torch.ones(2, 10, dtype=torch.float64)}
    chains = [{"chain": c, "initial_mean_loss": 1.0, "loss_scale": 1.0} for c in range(2)]
    result = SamplingResult(moments=None, chain_summaries=chains, traces=traces)
    BIFScorer._write_diagnostics(tmp_path, {storage.ALL_MODULES: result}, BIFArguments(sampler="rmsprop_sgld"))
    report = json.loads((tmp_path / storage.BIF_DIAGNOSTICS_FILE).read_text(), parse_constant=_reject)
    assert report["rhat_mean_train_loss"] is None and report["chains"][0]["ess_mean_train_loss"] is None


def _fitted_bif(tmp_path, model, train, **bif):
    """An Analyzer "p" with BIF factors "f" (sampler_batch_size 8, no checkpoints) on a plain regression Task."""
    task = PlainRegressionTask()
    args = BIFArguments(sampler_batch_size=8, checkpoint_interval=0, **bif)
    analyzer = Analyzer(
        "p", prepare_model(model, task), task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif"
    )
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    return analyzer


@pytest.mark.parametrize("monitored", [None, 20])  # every training row, or a seeded sample of 20 of the 48
def test_partition_jobs_report_the_diagnostics_of_the_full_run(
    tmp_path, trained_mlp, small_data, monkeypatch, monitored
):
    """The health trace is the chains', not the scored columns': each partition job writes the full run's numbers."""
    from kronfluence.arguments import ScoreArguments

    from kronfluence_bif.engine import evaluation as engine

    if monitored is not None:
        monkeypatch.setattr(engine, "MONITOR_ROWS", monitored)
    train, query = small_data
    analyzer = _fitted_bif(tmp_path, trained_mlp, train, num_chains=2, num_draws=40, num_burnin_steps=5)
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=4, per_device_train_batch_size=8)
    folders = {}

    def report(name):
        out = tmp_path / "p" / f"scores_{name}"
        return storage.load_json(out / storage.BIF_DIAGNOSTICS_FILE), storage.load_tensors(
            out / storage.BIF_TRACES_FILE
        )

    analyzer.compute_pairwise_scores("full", "f", **kw)
    folders["full"] = report("full")
    for p in (0, 1):
        analyzer.compute_pairwise_scores(
            f"job{p}", "f", score_args=ScoreArguments(data_partitions=2), target_data_partitions=[p], **kw
        )
        folders[p] = report(f"job{p}")
    full, full_traces = folders["full"]
    assert np.isfinite(full["rhat_mean_train_loss"])
    for p in (0, 1):
        diagnostics, traces = folders[p]
        assert diagnostics["rhat_mean_train_loss"] == pytest.approx(full["rhat_mean_train_loss"], rel=1e-6)
        assert [w["code"] for w in diagnostics["warnings"]] == [w["code"] for w in full["warnings"]]
        for chain, reference in zip(diagnostics["chains"], full["chains"]):
            assert chain.keys() == reference.keys()
            for key, value in reference.items():
                assert chain[key] == pytest.approx(value, rel=1e-6), key
        for name, trace in full_traces.items():
            torch.testing.assert_close(traces[name], trace, rtol=1e-6, atol=0.0, equal_nan=True)


def test_an_unpartitioned_run_reads_the_health_trace_from_its_scored_rows(
    tmp_path, trained_mlp, small_data, monkeypatch
):
    """Scoring a subset against the full posterior costs no extra evaluation for the trace (the subset is traced)."""
    from kronfluence_bif.engine import SamplingEngine

    seen = []
    original = SamplingEngine._monitor

    def spy(self, scored, rows):
        found = original(self, scored, rows)
        seen.append((list(rows), found[1] is None))
        return found

    monkeypatch.setattr(SamplingEngine, "_monitor", spy)
    train, query = small_data
    analyzer = _fitted_bif(tmp_path, trained_mlp, train, num_chains=1, num_draws=8, num_burnin_steps=2)
    rows = [3, 7, 11, 30]
    analyzer.compute_pairwise_scores(
        "s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=4, train_indices=rows
    )
    assert seen == [(rows, True)]


def test_step_diagnostics_off_changes_no_score_and_leaves_the_step_traces_empty(tmp_path):
    """`step_diagnostics=False` skips the per-draw norms and distance: the same scores bitwise, NaN step traces."""
    data = make_regression(48, seed=0)
    kw = dict(sampler="sgld", step_size=1e-3, nbeta=100.0, localization=100.0, num_draws=24, num_chains=2)
    runs = {}
    for flag in (True, False):
        model = prepare_model(fit(make_mlp(), data), PlainRegressionTask())
        out = str(tmp_path / str(flag))
        analyzer = Analyzer(
            "d", model, PlainRegressionTask(), cpu=True, output_dir=out, disable_tqdm=True, strategy="bif"
        )
        analyzer.fit_all_factors("f", data, bif_args=BIFArguments(**kw, step_diagnostics=flag))
        analyzer.compute_self_scores("s", "f", data)
        folder = tmp_path / str(flag) / "d" / "scores_s"
        runs[flag] = (
            analyzer.load_self_scores("s")["all_modules"],
            storage.load_tensors(folder / storage.BIF_TRACES_FILE),
            storage.load_json(folder / storage.BIF_DIAGNOSTICS_FILE),
        )
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1]["mean_train_loss"], runs[False][1]["mean_train_loss"])
    for name in STEP_TRACES:
        assert bool(runs[False][1][name].isnan().all()) and not bool(runs[True][1][name][:, 0].isnan().any()), name
    assert all(c["max_distance_from_w_star"] is None for c in runs[False][2]["chains"])
    assert all(c["max_distance_from_w_star"] > 0 for c in runs[True][2]["chains"])


def test_the_per_chain_trace_means_skip_the_untraced_draws():
    """Step traces hold NaN between their every-8th draws: the table averages the draws they were taken at."""
    from kronfluence_bif.diagnostics import _trace_lines

    nan = float("nan")
    traces = {
        "mean_train_loss": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        "distance_from_w_star": torch.tensor([[0.5, nan, 1.5]], dtype=torch.float64),
        "noise_step_norm": torch.full((1, 3), nan, dtype=torch.float64),  # step_diagnostics=False: nothing taken
    }
    row = _trace_lines(traces)[-1].split()
    assert row[:3] == ["0", "2", "1"] and row[3] == "nan"


def test_float32_rounded_tells_a_float32_cross_entropy_from_a_precise_one():
    """A float32 cross-entropy of confident logits gives losses that are multiples of 2^-23 (the log of a number next
    to 1); computed by precise_cross_entropy they are not; too few small values are not judged."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g)
    labels = logits.argmax(1)
    logits[torch.arange(500), labels] += 9.0 + 4.0 * torch.rand(500, generator=g)  # margins 9-13: losses 1e-6-1e-3
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    precise = precise_cross_entropy(logits, labels, reduction="none")
    assert int(((plain > 0) & (plain <= 1e-5)).sum()) >= 20  # the check has values to judge
    assert float32_rounded(plain)
    assert not float32_rounded(precise)
    assert not float32_rounded(plain[:10])  # fewer than 20 small values
    assert not float32_rounded(torch.rand(1000, generator=g) * 1e-5)  # small values that are not rounded

    traces = {"mean_train_loss": torch.ones(2, 8, dtype=torch.float64) + torch.randn(2, 8, dtype=torch.float64) * 1e-3}
    summaries = [{"chain": c, "initial_mean_loss": 1.0} for c in range(2)]
    args = BIFArguments(sampler="sgld", num_chains=2, num_draws=8, step_size=1e-4, nbeta=10.0, localization=1.0)
    report = summarize(traces, summaries, args, rounded_values=True)
    found = [w["message"] for w in report["warnings"] if w["code"] == "loss_precision"]
    assert len(found) == 1 and found[0].endswith(LOSS_PRECISION_MESSAGE)
    assert not [w for w in summarize(traces, summaries, args)["warnings"] if w["code"] == "loss_precision"]
