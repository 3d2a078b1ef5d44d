"""Subspace-SGLD: Rayleigh-Ritz eigenvalues on the sketch span, a chain that stays in w* + span(V) with the closed-form
covariance there, and the sampler through the Analyzer (resume, model unchanged, no-double-backward fallback)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise_equal, state_copy
from kronfluence.task import Task
from torch import nn

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.checkpoints import CheckpointStore
from kronfluence_bif.curvature import CurvatureSketch
from kronfluence_bif.diagnostics import format_diagnostics, preconditioned_sharpness
from kronfluence_bif.samplers import SAMPLERS, SketchSGLD, SubspaceSGLD
from kronfluence_bif.samplers.subspace import positive_curvature, rayleigh_ritz

F64 = torch.float64


def _spd(eigenvalues, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T, q


def _random_span(d, k, seed):
    """[k, d] orthonormal rows of a random span (not an invariant subspace of anything in particular)."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q.T.contiguous()


def _quadratic_ritz(h, basis):
    """Ritz pairs of 0.5 w^T H w at w = 0 (the sketch's eigenvalues are placeholders: Rayleigh-Ritz replaces them)."""
    w = torch.zeros(h.shape[0], dtype=F64, requires_grad=True)
    sketch = CurvatureSketch(basis=basis, eigenvalues=torch.ones(basis.shape[0], dtype=F64))
    return rayleigh_ritz(lambda: 0.5 * w @ h @ w, [w], sketch, batch_size=1)


def test_rayleigh_ritz_recovers_the_eigenvalues_of_h_on_the_span():
    h, q = _spd([50.0, 20.0, 5.0, 1.0, 0.3, 0.1], seed=0)
    mix, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64))
    invariant = (q[:, :3] @ mix).T.contiguous()  # the top-3 eigenspace, in a rotated (non-eigen) basis
    refined = _quadratic_ritz(h, invariant)
    torch.testing.assert_close(refined.eigenvalues, torch.tensor([50.0, 20.0, 5.0], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close((refined.basis @ q[:, :3]).abs(), torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    # on any span: the eigenvalues of V H V^T, and the rotated basis diagonalizes it
    span = _random_span(6, 3, seed=2)
    refined = _quadratic_ritz(h, span)
    expected = torch.linalg.eigvalsh(span @ h @ span.T).flip(0)
    torch.testing.assert_close(refined.eigenvalues, expected, rtol=1e-12, atol=0)
    projected = refined.basis @ h @ refined.basis.T
    torch.testing.assert_close(projected, torch.diag(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(refined.basis @ refined.basis.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-12)


def test_rayleigh_ritz_through_a_network_matches_its_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(20, 3, dtype=F64), torch.randn(20, 1, dtype=F64)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def loss_of(flat):
        chunks = [c.view_as(p) for c, p in zip(flat.split(sizes), params)]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], chunks)), (x,))
        return F.mse_loss(out, y, reduction="sum")

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat) / 20
    span = _random_span(flat.numel(), 5, seed=3)
    sketch = CurvatureSketch(basis=span, eigenvalues=torch.ones(5, dtype=F64))
    refined = rayleigh_ritz(lambda: F.mse_loss(model(x), y, reduction="sum"), params, sketch, batch_size=20)
    torch.testing.assert_close(refined.eigenvalues, torch.linalg.eigvalsh(span @ hessian @ span.T).flip(0))


def test_rayleigh_ritz_and_sharpness_through_sdpa_attention_match_the_eager_attention():
    """A Hugging Face GPT-2 with its default "sdpa" attention: the fused CPU kernel has no double backward, so the
    Hessian-vector products run under `double_backward()` (the math kernel); they equal eager attention's."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    sdpa = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, attn_pdrop=0.0)).double().eval()
    eager = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**config, attn_pdrop=0.0, attn_implementation="eager")
    ).double()
    eager.load_state_dict(sdpa.state_dict())
    eager.eval()
    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))

    def loss(model):
        return lambda: model(input_ids=ids, labels=ids).loss * ids.numel()

    values = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        params = [p for p in model.parameters() if p.requires_grad]
        span = _random_span(sum(p.numel() for p in params), 3, seed=4)
        sketch = CurvatureSketch(basis=span, eigenvalues=torch.ones(3, dtype=F64))
        seeded = torch.Generator().manual_seed(0)
        sharp = preconditioned_sharpness(loss(model), params, 1.0, 0.0, None, generator=seeded)
        values[name] = (rayleigh_ritz(loss(model), params, sketch, batch_size=3).eigenvalues, sharp)
    torch.testing.assert_close(values["sdpa"][0], values["eager"][0], rtol=1e-9, atol=1e-9)
    assert values["sdpa"][1] == pytest.approx(values["eager"][1], rel=1e-9)


def _quadratic_chain(d, nbeta, gamma, eps):
    """(H, Ritz pairs on a random 3-dim span of R^d, the weights, a subspace-SGLD chain on them started at w* = 0)
    for the potential nbeta/2 w^T H w + gamma/2 |w|^2."""
    h, _ = _spd([50.0, 20.0, 5.0, 1.0, 0.3, 0.1], seed=0)
    refined = _quadratic_ritz(h, _random_span(d, 3, seed=4))
    w, anchor = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
    sampler = SubspaceSGLD([w], [anchor], eps, nbeta, gamma, torch.Generator().manual_seed(0), refined)
    return h, refined, w, sampler


def test_chain_covariance_on_the_span_is_the_closed_form_and_zero_off_it():
    # potential nbeta/2 w^T H w + gamma/2 |w|^2 (a linear-Gaussian posterior), full-batch gradient H w, on a
    # random 3-dim span of R^6: with Ritz pairs (s, V), the restricted Hessian is diag(nbeta s + gamma) exactly,
    # so each coordinate alpha = V w is an AR(1) with rho = 1 - eps/2 and, with the noise variance
    # eps (1 - eps/4) prec, stationary variance eps (1 - eps/4) prec / (1 - rho^2) = prec, prec = 1 / (nbeta s + gamma):
    # exactly V diag(prec) V^T at any eps < 4 (plain SGLD's would be prec / (1 - eps/4)); eps 1.5 tells them apart
    d, nbeta, gamma, eps, steps, burnin = 6, 10.0, 2.0, 1.5, 30000, 50
    h, refined, w, sampler = _quadratic_chain(d, nbeta, gamma, eps)
    draws = torch.empty(steps, d, dtype=F64)
    for t in range(burnin + steps):
        sampler.step([h @ w], batch_size=1)
        if t >= burnin:
            draws[t - burnin] = w
    v = refined.basis
    prec = 1.0 / (nbeta * refined.eigenvalues + gamma)
    expected = v.T @ torch.diag(prec) @ v
    got = torch.cov(draws.T)
    # entry (i, j) of a sample covariance of N draws of independent AR(1)s: variance tau (C_ii C_jj + [i=j] C_ii^2) / N
    # with tau = (1 + rho^2) / (1 - rho^2) for products (rho^2 per lag); summed, E|err|_F^2 = tau (tr^2 + |C|_F^2) / N
    rho = 1 - eps / 2
    tau = (1 + rho**2) / (1 - rho**2)
    sd = math.sqrt(tau * (float(expected.trace()) ** 2 + float(expected.norm()) ** 2) / steps)
    err = float((got - expected).norm())
    assert err < 4 * sd, (err, sd)
    assert err > 0.05 * sd  # the draws are random: an exact match would mean the test compares nothing
    off_span = draws - (draws @ v.T) @ v
    assert float(off_span.abs().max()) < 1e-12


def test_equilibrium_rise_is_the_chains_mean_loss_rise():
    # the temperature pilot's yardstick: with loss 1/2 w^T H w on the span, V H V^T = diag(s) in the Ritz basis, so
    # the chain's mean loss is 1/2 sum_j s_j prec_j (equipartition, exact at any eps with the sqrt(1 - eps/4) noise)
    d, nbeta, gamma, eps, steps, burnin = 6, 10.0, 2.0, 1.0, 8000, 50
    h, refined, w, sampler = _quadratic_chain(d, nbeta, gamma, eps)
    prec = 1.0 / (nbeta * refined.eigenvalues + gamma)
    assert sampler.equilibrium_rise() == pytest.approx(0.5 * float((refined.eigenvalues * prec).sum()), rel=1e-12)
    losses = torch.empty(steps, dtype=F64)
    for t in range(burnin + steps):
        sampler.step([h @ w], batch_size=1)
        if t >= burnin:
            losses[t - burnin] = 0.5 * w @ h @ w
    # var of 1/2 s a^2 with a ~ N(0, prec) is s^2 prec^2 / 2; AR(1) draws (rho = 1 - eps/2) inflate it by
    # tau = (1 + rho^2) / (1 - rho^2)
    rho = 1 - eps / 2
    tau = (1 + rho**2) / (1 - rho**2)
    sd = math.sqrt(tau * float((refined.eigenvalues**2 * prec**2).sum()) / 2 / steps)
    assert abs(float(losses.mean()) - sampler.equilibrium_rise()) < 4 * sd


def test_norms_are_the_moves_it_makes_and_apply_root_is_g_half():
    h, _ = _spd([9.0, 4.0, 1.0, 0.5], seed=5)
    refined = _quadratic_ritz(h, _random_span(4, 2, seed=6))
    w = torch.randn(4, generator=torch.Generator().manual_seed(7), dtype=F64)
    w = (w @ refined.basis.T) @ refined.basis
    sampler = SubspaceSGLD([w], [torch.zeros(4, dtype=F64)], 0.5, 3.0, 2.0, torch.Generator().manual_seed(0), refined)
    sampler.track_norms = True
    before = w.clone()
    grad = h @ w
    sampler.step([grad], batch_size=1)
    v, prec = refined.basis, 1.0 / (3.0 * refined.eigenvalues + 2.0)
    g = v.T @ torch.diag(prec) @ v
    loss_move, loc_move = 0.25 * g @ (3.0 * grad), 0.25 * g @ (2.0 * before)
    noise_move = w - before + loss_move + loc_move
    expected = torch.stack([loss_move.norm(), loc_move.norm(), noise_move.norm()])
    torch.testing.assert_close(sampler.last_norms, expected, rtol=1e-10, atol=0)
    probe = torch.randn(4, generator=torch.Generator().manual_seed(8), dtype=F64)
    torch.testing.assert_close(sampler.apply_root([probe])[0], v.T @ (prec.sqrt() * (v @ probe)))


def test_subspace_arguments_and_registry():
    assert SAMPLERS["subspace_sgld"] is SubspaceSGLD and issubclass(SubspaceSGLD, SketchSGLD)
    args = BIFArguments(sampler="subspace_sgld")
    assert args.step_size == 1.0
    with pytest.raises(ValueError, match="localization must be > 0 with sampler='subspace_sgld'"):
        BIFArguments(sampler="subspace_sgld", localization=0.0)
    with pytest.raises(ValueError, match="step_size must be < 4 with sampler='subspace_sgld'"):
        BIFArguments(sampler="subspace_sgld", step_size=4.0)
    assert BIFArguments.from_dict(args.to_dict()) == args


class _OnceDifferentiableSquare(torch.autograd.Function):
    """(x - y)^2 summed, whose backward refuses to build a graph (a kernel without double backward)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out, target):
        return (out - target).pow(2).sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError("double backward is not implemented for this loss")
        out, target = ctx.saved_tensors
        return 2 * (out - target) * grad, None


class SampledTask(Task):
    """Squared error with targets sampled around the model's output for sample=True (kronfluence's true Fisher)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if sample:
            y = torch.normal(out.detach(), torch.ones_like(out))
        return self.square(out, y)

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    @staticmethod
    def square(out, target):
        return F.mse_loss(out, target, reduction="sum")


class NoDoubleBackwardTask(SampledTask):
    @staticmethod
    def square(out, target):
        return _OnceDifferentiableSquare.apply(out, target)


ARGS = dict(
    sampler="subspace_sgld",
    num_chains=2,
    num_draws=40,
    num_burnin_steps=5,
    sampler_batch_size=48,  # full batch
    draws_per_block=8,
    sketch_rank=16,
    nbeta=1e3,
    localization=1e2,
    num_threads=1,
)


def _analyzer(tmp_path, model, task, name="sub"):
    return Analyzer(name, model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif")


def _pairwise(analyzer, small_data, **bif):
    train, query = small_data
    analyzer.fit_all_factors("f", dataset=train, bif_args=BIFArguments(**{**ARGS, **bif}), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("pw", "f", query_dataset=query, train_dataset=train, per_device_query_batch_size=5)
    return analyzer.load_pairwise_scores("pw")["all_modules"]


class Interrupt(Exception):
    pass


def test_through_the_analyzer_pairwise_self_resume_and_model_unchanged(tmp_path, trained_mlp, small_data, monkeypatch):
    task = SampledTask()
    model = prepare_model(trained_mlp, task)
    saved = state_copy(model)
    analyzer = _analyzer(tmp_path / "ref", model, task)
    reference = _pairwise(analyzer, small_data, checkpoint_interval=16)
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    analyzer.compute_self_scores("self", "f", train_dataset=small_data[0])
    self_scores = analyzer.load_self_scores("self")["all_modules"]
    assert self_scores.shape == (48,) and torch.isfinite(self_scores).all() and self_scores.abs().max() > 0
    assert_bitwise_equal(model, saved)
    # interrupted after chain 0's first checkpoint, then resumed: bitwise the uninterrupted scores
    real, written = CheckpointStore.save, []

    def save(self, chain, tensors, meta):
        real(self, chain, tensors, meta)
        written.append(chain)
        if len(written) == 1:
            raise Interrupt

    monkeypatch.setattr(CheckpointStore, "save", save)
    with pytest.raises(Interrupt):
        _pairwise(_analyzer(tmp_path / "run", model, task), small_data, checkpoint_interval=16)
    assert_bitwise_equal(model, saved)
    monkeypatch.undo()
    resumed = _pairwise(_analyzer(tmp_path / "run", model, task), small_data, checkpoint_interval=16)
    assert torch.equal(resumed, reference)
    assert_bitwise_equal(model, saved)


def test_a_loss_without_double_backward_falls_back_to_the_sketch_eigenvalues(tmp_path, trained_mlp, small_data, caplog):
    task = NoDoubleBackwardTask()
    model = prepare_model(trained_mlp, task)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        scores = _pairwise(_analyzer(tmp_path, model, task), small_data, checkpoint_interval=0)
    assert "Rayleigh-Ritz failed (RuntimeError: double backward is not implemented" in caplog.text
    assert "Rayleigh-Ritz on the" not in caplog.text
    assert torch.isfinite(scores).all() and scores.abs().max() > 0
    # the linear control variate needs the Ritz values: off, and the diagnostics say the draws were sized for it
    report = json.loads((tmp_path / "sub" / "scores_pw" / "bif_diagnostics.json").read_text())
    assert report["linear_control_variate"]["applied"] is False
    assert any(w["code"] == "linear_control_variate" and "num_draws" in w["message"] for w in report["warnings"])
    printed = format_diagnostics(tmp_path / "sub" / "scores_pw")
    assert "Linear control variate: off (no Rayleigh-Ritz values" in printed


def test_a_collapsed_sketch_span_is_warned(tmp_path, trained_mlp, small_data, caplog):
    # full batch and a Task that ignores sample=True: every sketch gradient is the same, the span is 1-dimensional
    from conftest import PlainRegressionTask

    from kronfluence_bif import logs

    logs._warned.discard("subspace-low-rank")
    task = PlainRegressionTask()
    model = prepare_model(trained_mlp, task)
    with caplog.at_level(logging.INFO, logger="kronfluence_bif"):
        _pairwise(_analyzer(tmp_path, model, task), small_data, checkpoint_interval=0, num_draws=8)
    assert "subspace_sgld samples only a 1-dimensional span (sketch_rank=16)" in caplog.text


def test_directions_of_negative_curvature_are_dropped_from_the_span():
    h, _ = _spd([50.0, 20.0, 5.0, 1.0, 0.3, 0.1], seed=0)
    h = h - 2.0 * torch.eye(6, dtype=F64)  # indefinite: three eigenvalues < 0
    refined = _quadratic_ritz(h, _random_span(6, 4, seed=5))
    kept = positive_curvature(refined)
    positive = refined.eigenvalues > 0
    assert 0 < kept.rank < refined.rank
    torch.testing.assert_close(kept.eigenvalues, refined.eigenvalues[positive], rtol=0, atol=0)
    torch.testing.assert_close(kept.basis, refined.basis[positive], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no positive curvature"):
        positive_curvature(CurvatureSketch(basis=refined.basis, eigenvalues=-refined.eigenvalues.abs()))


def test_a_centred_chain_samples_around_w_star_and_an_uncentred_one_around_the_minimum():
    # loss 1/2 (w - m)^T H (w - m) with its minimum m != w* = 0: centred, the drift is nbeta H (w - w*) and the
    # posterior N(w*, (nbeta H + gamma)^-1) on the span; uncentred its mean is (nbeta H + gamma)^-1 nbeta H m there
    d, nbeta, gamma, eps, steps = 6, 10.0, 2.0, 1.0, 20000
    h, _ = _spd([50.0, 20.0, 5.0, 1.0, 0.3, 0.1], seed=0)
    m = torch.linspace(-1.0, 1.0, d, dtype=F64)
    refined = _quadratic_ritz(h, _random_span(d, 3, seed=4))
    v = refined.basis
    restricted = nbeta * torch.diag(refined.eigenvalues) + gamma * torch.eye(3, dtype=F64)
    prec = 1.0 / (nbeta * refined.eigenvalues + gamma)
    for centred in (True, False):
        w, anchor = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
        sampler = SubspaceSGLD([w], [anchor], eps, nbeta, gamma, torch.Generator().manual_seed(1), refined)
        if centred:
            sampler.center([h @ (anchor - m)])
        total = torch.zeros(3, dtype=F64)
        for t in range(50 + steps):
            sampler.step([h @ (w - m)], batch_size=1)
            if t >= 50:
                total += v @ w
        mean = total / steps
        expected = torch.zeros(3, dtype=F64) if centred else torch.linalg.solve(restricted, nbeta * v @ h @ m)
        # AR(1) with rho = 1 - eps/2 per Ritz direction: the mean of N draws has variance prec (1 + rho) / (1 - rho) / N
        sd = torch.sqrt(prec * 3.0 / steps)
        assert bool(((mean - expected).abs() < 4 * sd).all()), (centred, mean, expected, sd)
    assert float(expected.norm()) > 20 * float(sd.max())  # the two cases are far apart
