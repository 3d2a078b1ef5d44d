"""Sketch-SGLD: the curvature sketch estimates the Fisher, and the sampler's fixed full preconditioner leaves the
stationary covariance that the discrete Lyapunov equation predicts (sgld-notes.md, frozen preconditioner)."""

from __future__ import annotations

import math

import pytest
import torch
from kronfluence.task import Task
from scipy.linalg import solve_discrete_lyapunov

from kronfluence_bif import BIFArguments
from kronfluence_bif.curvature import CurvatureSketch, sketch_fisher
from kronfluence_bif.sampler import SGLD, Sampler, SketchSGLD


def _spd(eigenvalues, seed):
    q, _ = torch.linalg.qr(
        torch.randn(
            len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def _chain(sampler, lam, steps, burnin):
    w = sampler.params[0]
    draws = torch.empty(steps, w.numel(), dtype=w.dtype)
    for t in range(burnin + steps):
        sampler.step([lam @ w], batch_size=1)
        if t >= burnin:
            draws[t - burnin] = w
    return draws


def test_sketch_sgld_solves_discrete_lyapunov_and_mixes_stiff_and_flat_directions():
    # curvature 1000 .. 0.1 plus localization 1: plain SGLD needs eps < 4/1001 and then relaxes the flat
    # directions in ~1/(eps * 1.1) ~ 900 steps; with the top-3 curvature directions sketched, G ~ A^-1.
    d, gamma = 6, 1.0
    lam, q = _spd([1000.0, 300.0, 50.0, 0.5, 0.2, 0.1], seed=0)
    sketch = CurvatureSketch(
        basis=q[:, :3].T.contiguous(), eigenvalues=torch.tensor([1000.0, 300.0, 50.0], dtype=torch.float64)
    )
    eps, chains = 0.3, 16
    # 16 independent chains as one sampler: the blocks of a block-diagonal problem (potential kron(I, Lambda),
    # sketch basis kron(I, V^T)), so each block is one chain with the sketched G, all drawn in one step
    big_lam = torch.block_diag(*[lam] * chains)
    big = CurvatureSketch(
        basis=torch.block_diag(*[sketch.basis] * chains).contiguous(), eigenvalues=sketch.eigenvalues.repeat(chains)
    )
    w, anchor = torch.zeros(d * chains, dtype=torch.float64), torch.zeros(d * chains, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    sampler = SketchSGLD([w], [anchor], step_size=eps, nbeta=1.0, localization=gamma, generator=gen, sketch=big)
    draws = _chain(sampler, big_lam, 5000, 100).view(5000 * chains, d)  # [steps, chains * d]: chains' draws
    got = draws.T @ draws / draws.shape[0]  # the target's mean is 0 exactly
    a = lam + gamma * torch.eye(d, dtype=torch.float64)
    v = q[:, :3]
    precond = torch.linalg.inv(
        v @ torch.diag(torch.tensor([1000.0, 300.0, 50.0], dtype=torch.float64)) @ v.T
        + gamma * torch.eye(d, dtype=torch.float64)
    )
    m = torch.eye(d, dtype=torch.float64) - eps / 2 * precond @ a
    expected = torch.tensor(solve_discrete_lyapunov(m.numpy(), (eps * precond).numpy()))
    # G A has eigenvalues in [1, 1.5], so with eps = 0.3 the autocorrelation time is <= ~7 steps: 16 x 5000 draws
    # are >= ~5000 independent ones, a ~2% standard error on each covariance entry; 6% is three standard errors.
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.06, rel
    # the bias of the discretization is small: within 15% of the exact posterior A^-1
    exact = torch.linalg.inv(a)
    assert (expected - exact).norm() / exact.norm() < 0.15


def test_sketch_sgld_norms_match_the_moves_it_makes():
    d = 5
    lam, q = _spd([40.0, 9.0, 1.0, 0.5, 0.1], seed=1)
    sketch = CurvatureSketch(basis=q[:, :2].T.contiguous(), eigenvalues=torch.tensor([40.0, 9.0], dtype=torch.float64))
    w = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    anchor = torch.zeros(d, dtype=torch.float64)
    sampler = SketchSGLD([w], [anchor], 0.2, 3.0, 2.0, torch.Generator().manual_seed(0), sketch)
    sampler.track_norms = True
    before = w.clone()
    grad = lam @ w
    sampler.step([grad], batch_size=1)
    g = torch.linalg.inv(
        3.0 * q[:, :2] @ torch.diag(torch.tensor([40.0, 9.0], dtype=torch.float64)) @ q[:, :2].T
        + 2.0 * torch.eye(d, dtype=torch.float64)
    )
    loss_move = 0.1 * g @ (3.0 * grad)
    loc_move = 0.1 * g @ (2.0 * before)
    noise_move = w - before + loss_move + loc_move
    assert sampler.last_norms[0] == pytest.approx(float(loss_move.norm()), rel=1e-10)
    assert sampler.last_norms[1] == pytest.approx(float(loc_move.norm()), rel=1e-10)
    assert sampler.last_norms[2] == pytest.approx(float(noise_move.norm()), rel=1e-10)
    # the noise move is sqrt(eps) G^1/2 xi with G^1/2 the symmetric root and xi the generator's first normal draw
    evals, evecs = torch.linalg.eigh(g)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    xi = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = math.sqrt(0.2) * root @ xi
    assert (noise_move - expected).norm() / expected.norm() < 1e-10


def test_sketch_fisher_estimates_the_sampled_label_fisher():
    # linear regression with kronfluence's sampled targets (std 1 around the output) on sum (f - y)^2:
    # per-example Fisher 4 x x^T, so E[sketch] = 4 X^T X / n
    g = torch.Generator().manual_seed(0)
    n, d, m = 200, 3, 8
    x = torch.randn(n, d, generator=g) * torch.tensor([3.0, 1.0, 0.3])
    w = torch.zeros(d, requires_grad=True)

    def sampled_loss(idx):
        out = x[idx] @ w
        target = torch.normal(out.detach(), torch.ones_like(out), generator=g)
        return ((out - target) ** 2).sum()

    batches = [torch.randperm(n, generator=g)[:m] for _ in range(4000)]
    sketch = sketch_fisher(sampled_loss, batches, [w], batch_size=m)
    estimate = sketch.basis.T @ torch.diag(sketch.eigenvalues) @ sketch.basis
    expected = 4 * x.T @ x / n
    # 4000 rank-one terms of a 3 x 3 Gaussian-sampled Fisher: relative error ~ sqrt(2 / 4000) * (spread of
    # x^T x over batches) ~ 5%; 15% is three standard errors
    assert (estimate - expected).norm() / expected.norm() < 0.15
    assert sketch.rank == d
    assert torch.allclose(sketch.basis @ sketch.basis.T, torch.eye(d), atol=1e-5)


def test_sketch_sgld_arguments():
    args = BIFArguments(sampler="sketch_sgld")
    assert args.step_size == 0.25 and BIFArguments(sampler="rmsprop_sgld").step_size == 3e-4
    with pytest.raises(ValueError, match="localization must be > 0"):
        BIFArguments(sampler="sketch_sgld", localization=0.0)
    with pytest.raises(ValueError, match="step_size must be < 4"):
        BIFArguments(sampler="sketch_sgld", step_size=5.0)
    with pytest.raises(ValueError, match="sketch_rank"):
        BIFArguments(sampler="sketch_sgld", sketch_rank=0)
    assert BIFArguments.from_dict(args.to_dict()) == args
    assert issubclass(SketchSGLD, Sampler) and not issubclass(SketchSGLD, SGLD)


class SampledHalfSquaredLoss(Task):
    """0.5 (f - y)^2 on a linear model; sampled targets f + N(0, 1) give the exact Fisher x x^T (= the Hessian)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x).squeeze(-1)
        if sample:
            y = torch.normal(out.detach(), torch.ones_like(out))
        return 0.5 * (out - y).pow(2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_sketch_sgld_through_the_analyzer_matches_the_closed_form_at_condition_number_1000(tmp_path):
    # Lambda = nbeta/n X^T X + gamma I with eigenvalues ~3600 .. 3: plain SGLD would need eps < 1e-3 and ~1000
    # steps per independent draw; the sketched preconditioner makes every direction relax in ~1/eps = 5 steps.
    from torch import nn
    from torch.utils.data import TensorDataset

    from kronfluence_bif import Analyzer, prepare_model

    n_train, n_query, dim, nbeta, gamma, eps = 40, 6, 4, 400.0, 2.0, 0.2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_query, dim, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([3.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64) + 0.7 * torch.randn(
        n_train + n_query, generator=gen, dtype=torch.float64
    )
    w_star = torch.linalg.lstsq(x[:n_train], y[:n_train, None]).solution[:, 0]
    model = nn.Sequential(nn.Linear(dim, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(w_star[None, :])
    task = SampledHalfSquaredLoss()
    model = prepare_model(model, task)
    args = BIFArguments(
        sampler="sketch_sgld",
        num_chains=8,
        num_draws=1000,
        num_burnin_steps=50,
        draw_interval=2,
        step_size=eps,
        nbeta=nbeta,
        localization=gamma,
        sampler_batch_size=n_train,
        sketch_rank=400,
        seed=1,
    )
    analyzer = Analyzer(
        "sk", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=args
    )
    analyzer.fit_all_factors("bif", dataset=TensorDataset(x[:n_train], y[:n_train]))
    analyzer.compute_pairwise_scores(
        "s",
        "bif",
        query_dataset=TensorDataset(x[n_train:], y[n_train:]),
        train_dataset=TensorDataset(x[:n_train], y[:n_train]),
        per_device_query_batch_size=n_query,
        per_device_train_batch_size=n_train,
    )
    scores = analyzer.load_pairwise_scores("s")["all_modules"].double()
    lam = nbeta / n_train * x[:n_train].T @ x[:n_train] + gamma * torch.eye(dim, dtype=torch.float64)
    assert torch.linalg.cond(lam) > 1000
    # G ~ Lambda^-1 (sketch error ~ sqrt(1/400) per direction), so S = Lyapunov(G) ~ Lambda^-1 / (1 - eps/4)
    s_cov = torch.linalg.inv(lam) / (1 - eps / 4)
    r = y - x @ w_star
    s = x @ s_cov @ x.T
    expected = (r[:, None] * r[None, :] * s + 0.5 * s**2)[n_train:, :n_train]
    rel = (scores - expected).norm() / expected.norm()
    # 8000 draws 2 steps apart, autocorrelation <= ~5 steps (>= 1500 independent ones): ~4% MC error on the loss
    # covariances, plus <= 3% from the sketch's error in G A around 1; 10% is about twice that
    print(f"sketch-SGLD closed-form relative error {rel:.4f}")
    assert rel < 0.10, rel


def test_task_that_ignores_sample_is_warned_and_the_sketch_is_rescaled_to_stay_stable(tmp_path, caplog):
    # conftest's PlainRegressionTask returns the true-label loss for sample=True: the sketch is then the empirical
    # Fisher, ~(2 residual^2) x the curvature (~1/50 here), and the unscaled chain would diverge at its first draw
    import logging

    from conftest import PlainRegressionTask, fit, make_mlp, make_regression

    from kronfluence_bif import Analyzer, logs, prepare_model

    logs._warned.discard("sketch-no-sampling")  # warned once per process: an earlier test may have seen it
    train, query = make_regression(48, seed=0), make_regression(10, seed=1)
    task = PlainRegressionTask()
    model = prepare_model(fit(make_mlp(), train), task)
    args = BIFArguments(sampler="sketch_sgld", num_chains=2, num_draws=50, num_burnin_steps=20, sampler_batch_size=16)
    analyzer = Analyzer("nos", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")
    analyzer.fit_all_factors("f", dataset=train, bif_args=args)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        analyzer.compute_pairwise_scores(
            "s", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5
        )
    assert "returned the true-label loss on every one" in caplog.text
    assert "scaling the sketch up" in caplog.text
    scores = analyzer.load_pairwise_scores("s")["all_modules"]
    assert torch.isfinite(scores).all() and scores.abs().max() > 0


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_sketch_decomposes_on_the_smaller_side_and_reconstructs_the_fisher(shape):
    from kronfluence_bif.curvature import _eigen_pairs

    rows = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    basis, values = _eigen_pairs(rows)
    rank = min(shape)
    assert basis.shape == (rank, shape[1]) and values.shape == (rank,) and bool((values[:-1] >= values[1:]).all())
    torch.testing.assert_close(basis @ basis.T, torch.eye(rank), atol=1e-5, rtol=0)  # float32 basis
    torch.testing.assert_close(basis.T @ torch.diag(values.float()) @ basis, rows.T @ rows, atol=1e-4, rtol=1e-5)


def test_softmax_fisher_root_squares_to_the_cross_entropy_hessian():
    """L xi with xi ~ N(0, I) has covariance L L^T: it must be diag p - p p^T exactly, also for a confident p."""
    from kronfluence_bif.tasks import softmax_fisher_root

    for logits in (torch.randn(7, dtype=torch.float64), torch.tensor([12.0, 0.0, -3.0, 1.0], dtype=torch.float64)):
        p = logits.softmax(0)
        root = softmax_fisher_root(p.expand(len(p), -1), torch.eye(len(p), dtype=torch.float64)).T  # columns L e_k
        assert torch.allclose(root @ root.T, torch.diag(p) - torch.outer(p, p), atol=1e-15, rtol=1e-12)


def _confident_linear_classifier(n: int = 300, d: int = 6, classes: int = 4):
    """A linear classifier whose training labels are its argmax at margins > 12: sampled labels almost never flip."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * n, d, generator=g, dtype=torch.float64)
    weight = 4.0 * torch.randn(classes, d, generator=g, dtype=torch.float64)
    top = (x @ weight.T).topk(2, dim=1).values
    x = x[top[:, 0] - top[:, 1] > 12.0][:n]  # margins > 12: a drawn label flips with probability < 2e-5
    labels = (x @ weight.T).argmax(1)
    return torch.nn.Linear(d, classes, bias=False).double().requires_grad_(True), x, labels, weight


def test_fisher_probe_sketch_spans_a_confident_classifier_and_estimates_its_fisher():
    """ClassificationTask's Gaussian probe: every gradient carries every example, so K probes span K directions of a
    confident classifier (sampled labels give the same gradient but for rare flips), and their mean outer product is
    the Fisher sum_i (diag p_i - p_i p_i^T) kron x_i x_i^T / n within the sampling error of K Gaussian vectors."""
    from kronfluence_bif import ClassificationTask
    from kronfluence_bif.loss_views import LossViews
    from kronfluence_bif.task import BIFTask

    class SampledLabels(ClassificationTask):
        compute_fisher_probe = BIFTask.compute_fisher_probe  # not overridden: the sketch samples labels

    model, x, labels, weight = _confident_linear_classifier()
    with torch.no_grad():
        model.weight.copy_(weight)
    n = len(x)
    ranks = {}
    for task in (ClassificationTask(), SampledLabels()):
        views = LossViews(task)
        torch.manual_seed(0)
        sketch = sketch_fisher(lambda b, v=views: v.sampled_train_loss(b, model), [(x, labels)] * 16, [model.weight], n)
        ranks[type(task).__name__] = sketch.rank
    assert ranks["ClassificationTask"] == 16  # 24 weights: every probe adds a direction
    assert ranks["SampledLabels"] <= 2  # one full-batch gradient but where a label flips (< 0.006 flips per gradient)

    probs = (x @ weight.T).softmax(1)
    hessians = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    expected = torch.einsum("nab,ni,nj->aibj", hessians, x, x).reshape(24, 24) / n  # vec(W) is row-major
    k = 4000
    views = LossViews(ClassificationTask())
    torch.manual_seed(1)
    sketch = sketch_fisher(lambda b: views.sampled_train_loss(b, model), [(x, labels)] * k, [model.weight], n)
    estimate = sketch.basis.T.double() @ torch.diag(sketch.eigenvalues.double()) @ sketch.basis.double()
    # a sample covariance of K Gaussian vectors: E |S_K - S|_F^2 = (|S|_F^2 + tr(S)^2) / K; three standard errors
    spread = math.sqrt((expected.norm() ** 2 + expected.trace() ** 2) / k)
    assert (estimate - expected).norm() < 3 * spread
