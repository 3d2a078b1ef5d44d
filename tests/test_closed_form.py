"""Exactness: on a linear model with squared loss the localized posterior is Gaussian (DESIGN.md section 7).

l_i(w) = 0.5 (y_i - x_i.w)^2, Lambda = (nbeta/n) X^T X + gamma I. Full-batch SGLD with step eps has the
stationary covariance S = Lambda^-1 (I - eps Lambda / 4)^-1 exactly, and then

    Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2,    s_ij = x_i^T S x_j,  r = y - X w*.

The estimate goes through the public Analyzer on a plain kronfluence Task (the vmap per-example path).
"""

from typing import Any

import pytest
import torch
from kronfluence.task import Task
from scipy.linalg import solve_discrete_lyapunov
from torch import nn
from torch.utils.data import TensorDataset

from kronfluence_bif import Analyzer, BIFArguments, prepare_model
from kronfluence_bif.sampler import SGLD, RMSpropSGLD

N_TRAIN, N_QUERY, DIM = 40, 6, 4
NBETA, GAMMA, EPS = 40.0, 2.0, 0.012


class HalfSquaredLoss(Task):
    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        return 0.5 * (model(x).squeeze(-1) - y).pow(2).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERY, DIM, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64) + 0.7 * torch.randn(
        N_TRAIN + N_QUERY, generator=gen, dtype=torch.float64
    )
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    w_star = torch.linalg.lstsq(xtr, ytr[:, None]).solution[:, 0]
    return x, y, w_star


def _expected_cov(x, y, w_star, eps):
    xtr = x[:N_TRAIN]
    lam = NBETA / N_TRAIN * xtr.T @ xtr + GAMMA * torch.eye(DIM, dtype=torch.float64)
    s_cov = torch.linalg.inv(lam) @ torch.linalg.inv(torch.eye(DIM, dtype=torch.float64) - eps * lam / 4)
    r = y - x @ w_star
    s = x @ s_cov @ x.T
    cov = r[:, None] * r[None, :] * s + 0.5 * s**2
    return cov, lam


def test_full_batch_sgld_matches_closed_form(tmp_path):
    x, y, w_star = _problem()
    model = nn.Sequential(nn.Linear(DIM, 1, bias=False)).double()  # kronfluence cannot wrap a bare root Linear
    with torch.no_grad():
        model[0].weight.copy_(w_star[None, :])
    task = HalfSquaredLoss()
    model = prepare_model(model, task)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    query = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    args = BIFArguments(
        sampler="sgld",
        num_chains=8,
        num_draws=500,
        num_burnin_steps=200,
        draw_interval=4,
        step_size=EPS,
        nbeta=NBETA,
        localization=GAMMA,
        sampler_batch_size=N_TRAIN,
        seed=3,
    )
    analyzer = Analyzer(
        "closed", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=args
    )
    analyzer.fit_all_factors("bif", dataset=train)
    analyzer.compute_pairwise_scores(
        "s",
        "bif",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=N_QUERY,
        per_device_train_batch_size=N_TRAIN,
    )
    scores = analyzer.load_pairwise_scores("s")["all_modules"].double()  # [q, n]

    cov, lam = _expected_cov(x, y, w_star, EPS)
    assert float(EPS * torch.linalg.eigvalsh(lam).max()) < 1.0  # a regime where SGLD's bias is visible but bounded
    expected = cov[N_TRAIN:, :N_TRAIN]
    rel = (scores - expected).norm() / expected.norm()
    print(f"closed-form relative Frobenius error {rel:.4f}")
    # Monte Carlo error: 0.027 measured with 8 x 1250 draws, so ~0.027 sqrt(1250 / 500) = 0.043 here; 0.10 is
    # more than twice that. The SGLD correction itself is 0.117 of the expected norm (eps lambda / 4 up to 0.18).
    assert rel <= 0.10, f"relative Frobenius error {rel:.3f}"
    # The exact-posterior covariance (no SGLD correction) must be distinguishably further away than MC error.
    exact, _ = _expected_cov(x, y, w_star, 0.0)
    rel_exact = (scores - exact[N_TRAIN:, :N_TRAIN]).norm() / expected.norm()
    assert rel_exact > rel


def _quadratic_chains(sampler_cls, lam, step, steps, burnin, chains, seed, **kwargs):
    """`chains` independent chains sampling N(0, Lambda^-1) with one sampler object, as the columns of one [d,
    chains] parameter (potential gradient Lambda w; every sampler here is elementwise, so the columns are
    independent chains with their own diagonal preconditioners). Returns draws [steps, chains, d] and the sampler."""
    d = lam.shape[0]
    w = torch.zeros(d, chains, dtype=torch.float64)
    anchor = torch.zeros(d, chains, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    # nbeta=1, batch=1, localization 0: all of Lambda is in the "loss" gradient
    sampler = sampler_cls([w], [anchor], step_size=step, nbeta=1.0, localization=0.0, generator=gen, **kwargs)
    draws = torch.empty(steps, chains, d, dtype=torch.float64)
    for t in range(burnin + steps):
        sampler.step([lam @ w], batch_size=1)
        if t == burnin - 1:
            sampler.freeze()
        if t >= burnin:
            draws[t - burnin] = w.T
    return draws, sampler


def _second_moment(draws: torch.Tensor) -> torch.Tensor:
    """E[w w^T] over [steps, d] draws: the target's mean is 0 exactly, so no sample mean is subtracted."""
    return draws.T @ draws / draws.shape[0]


def test_sgld_step_stationary_covariance():
    lam = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    eps = 0.2
    # eps*lambda/2 is 0.16..0.44, so the integrated autocorrelation of w^2 is <= 6 steps: 64 chains x 1250 draws
    # are >= ~13000 independent ones and the relative error of a 2x2 covariance is ~sqrt(2/13000) = 1.2%; 5% is
    # four standard errors. The chains start at the mean and relax within 100 steps (0.84^200 ~ 1e-15).
    draws, _ = _quadratic_chains(SGLD, lam, eps, 1250, 100, chains=64, seed=0)
    expected = torch.linalg.inv(lam) @ torch.linalg.inv(torch.eye(2, dtype=torch.float64) - eps * lam / 4)
    rel = (_second_moment(draws.reshape(-1, 2)) - expected).norm() / expected.norm()
    assert rel < 0.05, rel


def test_frozen_rmsprop_sgld_solves_discrete_lyapunov():
    """With G frozen after burn-in, S solves S = A S A^T + eps G, A = I - eps/2 G Lambda (sgld-notes.md)."""
    lam = torch.tensor([[30.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    eps, chains = 0.05, 24
    draws, sampler = _quadratic_chains(RMSpropSGLD, lam, eps, 7500, 300, chains=chains, seed=0, alpha=0.99, eps=0.1)
    got, expected = [], []
    for c in range(chains):  # each chain froze its own G
        precond = torch.diag(sampler._precond[0][:, c])
        a = torch.eye(2, dtype=torch.float64) - eps / 2 * precond @ lam
        expected.append(torch.tensor(solve_discrete_lyapunov(a.numpy(), (eps * precond).numpy())))
        got.append(_second_moment(draws[:, c]))
    # slowest eigenvalue of A is ~0.98 (integrated autocorrelation of w^2 ~50 steps): 24 x 7500 = 180000 draws are
    # ~3600 independent ones, a ~2.4% standard error on the covariance; 10% is four standard errors.
    got, expected = torch.stack(got).mean(0), torch.stack(expected).mean(0)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.10, rel
    # ...and an adapting preconditioner would not be what the formula describes: G differs from plain SGLD's 1
    assert not torch.allclose(precond, torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_model_keeps_noise_in_fp32_master(tmp_path, dtype):
    """eps-sized noise would round to zero in bf16; the fp32 master keeps the chain moving."""
    from kronfluence_bif.parameters import SampledWeights

    lin = nn.Linear(3, 2).to(dtype)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with SampledWeights(lin, list(lin.named_parameters())) as weights:
        assert all(m.dtype == torch.float32 for m in weights.masters)
        sampler = SGLD(weights.masters, weights.anchors, 1e-6, 1.0, 0.0, torch.Generator().manual_seed(0))
        for _ in range(10):
            sampler.step([torch.zeros_like(m) for m in weights.masters], 1)
        assert float(weights.distance_from_anchor()) > 0
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])
