"""The linear control variate (`engine/linear_term.py`): exact on a quadratic posterior, its algebra, when it is off.

On a linear model with squared loss, l_i(w) = 0.5 (x_i.w - y_i)^2, subspace-SGLD with a span covering every weight
samples N(w*, S) with S = Lambda^-1, Lambda = (nbeta / n) X^T X + gamma I, and at step_size 2 its draws are i.i.d.
(the chain's AR(1) coefficient 1 - eps/2 is zero). Then Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2 (s = X S X^T,
r = y - X w*), and the control variate takes the first term exactly: only the second needs the draws. The tolerance
is the estimator's own spread, simulated with i.i.d. draws from N(0, S).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_mlp, make_regression, state_copy
from kronfluence.task import Task
from safetensors.torch import load_file
from test_per_token import T, TokenData, TokenTask, trained_bigram
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, ScoreArguments, prepare_model
from kronfluence_bif.checkpoints import CheckpointStore
from kronfluence_bif.diagnostics import format_diagnostics, summarize
from kronfluence_bif.engine.linear_term import LinearControlVariate
from kronfluence_bif.moments import CrossMoments
from kronfluence_bif.samplers import SubspaceSGLD

F64 = torch.float64
N_TRAIN, N_QUERY, DIM = 40, 6, 4
NBETA, GAMMA = 400.0, 20.0
CHAINS, DRAWS = 2, 200


class SampledHalfSquares(Task):
    """0.5 (x.w - y)^2 per example; sample=True draws y around the model's output (the sketch's Fisher)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x).reshape(y.shape)
        if sample:
            y = torch.normal(out.detach(), torch.ones_like(out))
        return 0.5 * (out - y).pow(2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERY, DIM, generator=gen)
    y = x @ torch.tensor([1.0, -0.5, 0.25, 2.0]) + 0.7 * torch.randn(N_TRAIN + N_QUERY, generator=gen)
    w_star = torch.linalg.lstsq(x[:N_TRAIN].double(), y[:N_TRAIN, None].double()).solution[:, 0].float()
    model = nn.Sequential(nn.Linear(DIM, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w_star[None, :])
    return x, y, model


def _posterior(x, y, model):
    """(S, r): the posterior covariance and the residuals y - X w* (float64)."""
    xd, w = x.double(), model[0].weight.detach().double()[0]
    lam = NBETA / N_TRAIN * xd[:N_TRAIN].T @ xd[:N_TRAIN] + GAMMA * torch.eye(DIM, dtype=F64)
    return torch.linalg.inv(lam), y.double() - xd @ w


def _quadratic_case():
    """(x, y, prepared model, task, S, r, Cov): the linear problem, its posterior and the exact covariance of the
    losses, Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2 with s = X S X^T."""
    x, y, model = _linear_problem()
    task = SampledHalfSquares()
    model = prepare_model(model, task)
    s_cov, r = _posterior(x, y, model)
    s = x.double() @ s_cov @ x.double().T
    return x, y, model, task, s_cov, r, r[:, None] * r[None, :] * s + 0.5 * s**2


def _estimates(draws, x, r):
    """(raw, control variate) estimates of Cov(l_i, l_j) [all, all] from draws [N, DIM] of w - w* ~ N(0, S)."""
    xd = x.double()
    u = draws @ xd.T  # x_i.(w - w*)
    values, linear = 0.5 * (u - r) ** 2, -r * u

    def cov(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return a.T @ b / (a.shape[0] - 1)

    return cov(values, values), cov(values, values) - cov(linear, linear)


def _simulated_errors(s_cov, x, r, expected, replicas=200, antithetic=False):
    """RMS relative Frobenius errors of the raw and the controlled estimate (their exact linear part added) over
    i.i.d. replicas of CHAINS x DRAWS draws: the estimators' own spread. `antithetic`: the draws come in pairs d,
    -d (each i.i.d. draw with its mirror, as two mirrored chains at step 2 give)."""
    gen = torch.Generator().manual_seed(2 if antithetic else 1)
    root = torch.linalg.cholesky(s_cov)
    xd = x.double()
    exact_linear = (r[:, None] * r[None, :]) * (xd @ s_cov @ xd.T)
    errors = []
    for _ in range(replicas):
        draws = torch.randn(CHAINS * DRAWS // (2 if antithetic else 1), DIM, generator=gen, dtype=F64) @ root.T
        raw, controlled = _estimates(torch.cat([draws, -draws]) if antithetic else draws, x, r)
        errors.append([(est - expected).norm() / expected.norm() for est in (raw, controlled + exact_linear)])
    return torch.tensor(errors).square().mean(0).sqrt()


def _scores(tmp_path, model, task, x, y, name, **bif):
    args = BIFArguments(
        sampler="subspace_sgld",
        num_chains=CHAINS,
        num_draws=DRAWS,
        num_burnin_steps=5,
        step_size=2.0,
        nbeta=NBETA,
        localization=GAMMA,
        sketch_rank=DIM,
        seed=3,
        num_threads=1,
        **bif,
    )
    train, query = TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    kw = dict(per_device_train_batch_size=N_TRAIN)
    analyzer.compute_pairwise_scores("pw", "f", query, train, per_device_query_batch_size=N_QUERY, **kw)
    analyzer.compute_self_scores("self", "f", train, **kw)
    pairwise = analyzer.load_pairwise_scores("pw")["all_modules"].double()
    return pairwise, analyzer.load_self_scores("self")["all_modules"].double()


def test_on_a_quadratic_posterior_the_leading_term_is_exact_and_only_the_rest_is_sampled(tmp_path, caplog):
    x, y, model, task, s_cov, r, cov = _quadratic_case()
    expected = {"pairwise": cov[N_TRAIN:, :N_TRAIN], "self": cov.diagonal()[:N_TRAIN]}
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        controlled = _scores(tmp_path / "on", model, task, x, y, "on", antithetic_chains=False)  # i.i.d., as simulated
    assert "linear part on the 4-dimensional span, by 8 evaluations" in caplog.text
    report = json.loads((tmp_path / "on" / "on" / "scores_pw" / "bif_diagnostics.json").read_text())
    applied = report["linear_control_variate"]
    assert applied["applied"] is True and applied["span_rank"] == DIM
    # i.i.d. draws of the exact posterior: the variance ratio is 1 within its Monte-Carlo spread, sqrt(2 / 400) each
    assert abs(applied["coordinate_variance_ratio"] - 1.0) < 4 * (2.0 / (CHAINS * DRAWS) / DIM) ** 0.5
    assert not report["warnings"]
    printed = format_diagnostics(tmp_path / "on" / "on" / "scores_pw")
    assert f"Linear control variate: on a {DIM}-dimensional span; the chains' variance there is" in printed
    raw = _scores(tmp_path / "off", model, task, x, y, "off", linear_control_variate=False, antithetic_chains=False)

    full = cov.clone()
    rms_raw, rms_controlled = _simulated_errors(s_cov, x, r, full)
    print(f"simulated RMS relative errors: raw {float(rms_raw):.4f}, controlled {float(rms_controlled):.4f}")
    assert rms_controlled < rms_raw / 3  # what the control variate is for: here the first term dominates
    for kind, on, off in zip(("pairwise", "self"), controlled, raw):
        err_on = float((on - expected[kind]).norm() / expected[kind].norm())
        err_off = float((off - expected[kind]).norm() / expected[kind].norm())
        print(f"{kind}: relative error {err_on:.4f} with the control variate, {err_off:.4f} without")
        # the sub-blocks' errors are of the order of the full matrix's; 4 x its RMS is far in the tail
        assert err_on < 4 * float(rms_controlled), kind
        assert err_off < 4 * float(rms_raw), kind
        assert err_on < err_off, kind


def _moments_with_coordinates(draws=400, dim_x=5, dim_y=3, rank=4, diagonal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(draws, rank, generator=gen, dtype=F64) * torch.tensor([1.0, 0.5, 2.0, 0.1], dtype=F64)
    x = c @ torch.randn(rank, dim_x, generator=gen, dtype=F64) + 0.1 * torch.randn(draws, dim_x, generator=gen)
    y = x if diagonal else c @ torch.randn(rank, dim_y, generator=gen, dtype=F64)
    moments = CrossMoments(dim_x, y.shape[1], diagonal=diagonal, coordinates=rank)
    moments.update(x, y, c)
    return moments, x, y, c


@pytest.mark.parametrize("diagonal", [False, True])
def test_the_correction_is_j_times_the_variance_gap_times_j(diagonal):
    moments, x, y, c = _moments_with_coordinates(diagonal=diagonal)
    gen = torch.Generator().manual_seed(5)
    jx = torch.randn(x.shape[1], 4, generator=gen, dtype=F64)
    jy = jx if diagonal else torch.randn(y.shape[1], 4, generator=gen, dtype=F64)
    variance = torch.tensor([1.2, 0.2, 3.0, 0.02], dtype=F64)
    term = LinearControlVariate(jx, jy, variance)
    gap = torch.diag(variance) - torch.cov(c.T)
    before_xy, before_x, before_y = moments.covariance(), moments.variance_x(), moments.variance_y()
    ratio = term.apply_(moments)
    assert ratio == pytest.approx(float((torch.cov(c.T).diagonal() / variance).mean()), rel=1e-12)
    full = jy @ gap @ jx.T
    expected_xy = full.diagonal() if diagonal else full
    assert torch.allclose(moments.covariance() - before_xy, expected_xy, atol=1e-12)
    assert torch.allclose(moments.variance_x() - before_x, (jx @ gap @ jx.T).diagonal(), atol=1e-12)
    assert torch.allclose(moments.variance_y() - before_y, (jy @ gap @ jy.T).diagonal(), atol=1e-12)
    assert moments.coordinates is None  # consumed: a second apply_ refuses
    with pytest.raises(ValueError, match="span coordinates"):
        term.apply_(moments)


def test_the_draws_coordinates_pool_resume_and_are_asked_for():
    whole, x, y, c = _moments_with_coordinates()
    halves = [CrossMoments(5, 3, coordinates=4) for _ in range(2)]
    halves[0].update(x[:150], y[:150], c[:150])
    halves[1].update(x[150:], y[150:], c[150:])
    pooled = CrossMoments.from_state_dict(halves[0].state_dict()).merge_(halves[1])
    assert torch.allclose(pooled.coordinates.covariance(), whole.coordinates.covariance(), atol=1e-12)
    assert torch.allclose(pooled.coordinates.covariance(), torch.cov(c.T), atol=1e-12)
    with pytest.raises(ValueError, match="span coordinates"):
        CrossMoments(5, 3).merge_(pooled)
    with pytest.raises(ValueError, match="span coordinates"):
        pooled.update(x[:2], y[:2])


def _mlp_run(tmp_path, name, **bif):
    train, query = make_regression(48, seed=0), make_regression(10, seed=1)
    task = SampledHalfSquares()
    model = prepare_model(make_mlp(), task)
    args = dict(sampler="subspace_sgld", num_chains=2, num_draws=16, num_burnin_steps=3, sketch_rank=8)
    args.update(nbeta=1e3, localization=1e2, num_threads=1, **bif)
    analyzer = Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=BIFArguments(**args))
    analyzer.compute_pairwise_scores("pw", "f", query, train, per_device_query_batch_size=5)
    return analyzer.load_pairwise_scores("pw")["all_modules"], state_copy(model)


def test_off_where_the_span_is_not_the_chains_own_and_for_samplers_that_move_every_weight(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        minibatch, _ = _mlp_run(tmp_path / "a", "a", sampler_batch_size=16)  # Ritz values of a minibatch
    assert "linear_control_variate: off for this run" in caplog.text
    plain, _ = _mlp_run(tmp_path / "b", "b", sampler_batch_size=16, linear_control_variate=False)
    assert torch.equal(minibatch, plain)
    assert BIFArguments(sampler="rmsprop_sgld", linear_control_variate=True).linear_control_variate is False
    assert BIFArguments(sampler="subspace_sgld").linear_control_variate is True
    # the draws: fewer where the control variate takes the leading term (full batch), as many as before elsewhere
    assert BIFArguments(sampler="subspace_sgld").num_draws == 100
    assert BIFArguments(sampler="subspace_sgld", sampler_batch_size=16).num_draws == 400
    assert BIFArguments(sampler="rmsprop_sgld").num_draws == 400
    assert BIFArguments().resolved(30_000, 900, 1000).num_draws == 100  # auto: full batch
    assert BIFArguments().resolved(30_000, 90_000, 1000).num_draws == 400  # auto: a minibatch
    assert BIFArguments(num_draws=7).resolved(30_000, 900, 1000).num_draws == 7
    assert BIFArguments(sampler="subspace_sgld", linear_control_variate=False).num_draws == 400  # asked off
    tiny = BIFArguments().resolved(30_000, 50, 10)  # a "minibatch" of the whole training set is the full batch
    assert tiny.sampler_batch_size is None and tiny.num_draws == 100
    with pytest.raises(ValueError, match="linear_control_variate"):
        BIFArguments(linear_control_variate="yes")
    # antithetic pairs: subspace-SGLD's default, off for the others unless asked
    assert BIFArguments(sampler="subspace_sgld").antithetic_chains is True
    assert BIFArguments(sampler="rmsprop_sgld").antithetic_chains is False
    assert BIFArguments(sampler="sgld", antithetic_chains=True).antithetic_chains is True
    assert BIFArguments().resolved(30_000, 900, 1000).antithetic_chains is True
    # not where the linear control variate is off: a minibatch, or asked off
    assert BIFArguments().resolved(30_000, 90_000, 1000).antithetic_chains is False
    assert BIFArguments(sampler="subspace_sgld", linear_control_variate=False).antithetic_chains is False
    assert BIFArguments(sampler="subspace_sgld", sampler_batch_size=16, antithetic_chains=True).antithetic_chains
    with pytest.raises(ValueError, match="antithetic_chains"):
        BIFArguments(antithetic_chains=1)


def test_per_token_values_keep_their_sums_and_their_masked_zeros(tmp_path, caplog):
    """Per-token scores with the control variate: J is linear in the values (secants), so summing the tokens gives
    the sequence scores (the float32 bound of test_per_token.py), and a masked token (zero at every weight) has zero
    secants and scores exactly 0."""
    train, query = TokenData(24, 0), TokenData(3, 1, prompt=3)
    task = TokenTask()
    model = prepare_model(trained_bigram(train, 200), task)
    args = BIFArguments(
        sampler="subspace_sgld", num_chains=2, num_draws=30, num_burnin_steps=5, sketch_rank=16, nbeta=1e3
    )  # full batch: the control variate applies
    analyzer = Analyzer("t", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("bif", train, bif_args=args)
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=2, per_device_train_batch_size=5)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        analyzer.compute_pairwise_scores("tok", "bif", score_args=ScoreArguments(compute_per_token_scores=True), **kw)
    assert "linear_control_variate: the values' linear part" in caplog.text
    analyzer.compute_pairwise_scores("seq", "bif", **kw)
    tok = analyzer.load_pairwise_scores("tok")["all_modules"].double()
    seq = analyzer.load_pairwise_scores("seq")["all_modules"].double()
    assert tok.shape == (3, 24, T)
    assert torch.allclose(tok.sum(2), seq, rtol=0, atol=1e-5 * float(seq.abs().max()))
    masked = train.labels == -100
    masked[:, 0] = True
    assert bool((tok[:, masked] == 0).all()) and bool((tok[:, ~masked] != 0).all())


def test_column_blocks_and_correlation_with_the_control_variate(tmp_path, caplog):
    """Each column block corrects its own columns (same chains, the same J columns); normalize=True reads the
    corrected variances, so the correlations stay in [-1, 1]."""
    whole, _ = _mlp_run(tmp_path / "a", "a")
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        blocks, _ = _mlp_run(tmp_path / "b", "b", moment_memory_gb=2e-6)  # [10, 48] float64 sums: 2 blocks
    assert "computing 2 blocks of training columns" in caplog.text
    assert torch.allclose(blocks, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))
    corr, _ = _mlp_run(tmp_path / "c", "c", normalize=True)
    assert float(corr.abs().max()) <= 1.0 and float(corr.abs().max()) > 0.1


class _Interrupt(Exception):
    pass


def test_a_checkpoint_that_disagrees_on_the_span_coordinates_starts_over(tmp_path, monkeypatch, caplog):
    """Whether the span is exact depends on the environment (double backward), not on the arguments the checkpoint
    fingerprints: a chain whose checkpoint kept coordinates the resumed run does not keep starts over."""
    real, saves = CheckpointStore.save, []

    def save(self, chain, tensors, meta):
        real(self, chain, tensors, meta)
        saves.append(chain)
        raise _Interrupt

    monkeypatch.setattr(CheckpointStore, "save", save)
    with pytest.raises(_Interrupt):
        _mlp_run(tmp_path / "run", "r", checkpoint_interval=8)
    monkeypatch.setattr(CheckpointStore, "save", real)
    monkeypatch.setattr(SubspaceSGLD, "linear_span", lambda self: None)  # this environment: no exact span
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        resumed, _ = _mlp_run(tmp_path / "run", "r", checkpoint_interval=8)
    assert "disagrees on the span coordinates; it starts over" in caplog.text
    fresh, _ = _mlp_run(tmp_path / "fresh", "f", checkpoint_interval=8)
    assert torch.equal(resumed, fresh)


def test_what_the_diagnostics_say_of_the_control_variate():
    args = BIFArguments(sampler="subspace_sgld")
    traces = {"mean_train_loss": torch.zeros(2, 10, dtype=F64)}

    def codes(term):
        return [w["code"] for w in summarize(traces, [], args, None, term)["warnings"]]

    assert codes(None) == [] and "linear_control_variate" not in summarize(traces, [], args)
    assert codes({"applied": False, "reason": "a minibatch gradient"}) == []  # by design: 400 draws there
    assert codes({"applied": False, "reason": "no Rayleigh-Ritz values (no double backward)"}) == [
        "linear_control_variate"
    ]
    applied = {"applied": True, "span_rank": 8, "coordinate_variance_ratio": 1.03}
    assert codes(applied) == [] and summarize(traces, [], args, None, applied)["linear_control_variate"] == applied
    assert codes({**applied, "coordinate_variance_ratio": 2.5}) == ["linear_control_variate"]


def test_antithetic_chains_mirror_each_other_and_keep_the_estimate_within_its_spread(tmp_path):
    """Subspace-SGLD's default pairs the chains: on a quadratic posterior with the drift centred at w* (linear),
    chain 1 is chain 0 reflected through w*, step for step, so every even function of w - w* (the distance, the
    train loss at a least-squares w*) has the same trace; the scores stay within the antithetic estimator's own
    simulated spread, and turning the pairing off gives independent chains."""
    x, y, model, task, s_cov, r, cov = _quadratic_case()
    paired = _scores(tmp_path / "paired", model, task, x, y, "paired")
    traces = load_file(str(tmp_path / "paired" / "paired" / "scores_pw" / "bif_traces.safetensors"))
    for name in ("distance_from_w_star", "mean_train_loss"):  # the distance is traced at every 8th draw
        kept = torch.isfinite(traces[name][0])
        first, second = traces[name][0][kept].double(), traces[name][1][kept].double()
        assert torch.allclose(first, second, rtol=1e-4, atol=1e-7), name  # float32 steps: rounding only
        assert float((first - first.mean()).abs().max()) > 1e-2 * float(first.abs().max()), name  # it moves
    rms = float(_simulated_errors(s_cov, x, r, cov, antithetic=True)[1])
    err = float((paired[0] - cov[N_TRAIN:, :N_TRAIN]).norm() / cov[N_TRAIN:, :N_TRAIN].norm())
    print(f"antithetic: relative error {err:.4f}, simulated RMS {rms:.4f}")
    assert err < 4 * rms
    independent = _scores(tmp_path / "free", model, task, x, y, "free", antithetic_chains=False)
    traces = load_file(str(tmp_path / "free" / "free" / "scores_pw" / "bif_traces.safetensors"))
    distance = traces["distance_from_w_star"][:, torch.isfinite(traces["distance_from_w_star"][0])]
    assert float((distance[0] - distance[1]).abs().max()) > 1e-2 * float(distance[0].abs().max())
    assert not torch.equal(independent[0], paired[0])
