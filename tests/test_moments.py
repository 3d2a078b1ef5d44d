"""Streaming shifted moments equal batch statistics of stored traces (float64 precision)."""

import torch

from kronfluence_bif.moments import CrossMoments


def _traces(draws=300, nx=7, ny=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(draws, 3, generator=gen, dtype=torch.float64)
    x = z @ torch.randn(3, nx, generator=gen, dtype=torch.float64) + 1e3  # large offset: cancellation bait
    y = z @ torch.randn(3, ny, generator=gen, dtype=torch.float64) - 5e2
    return x, y


def _stream(x, y, shift_x, shift_y, block, diagonal=False):
    m = CrossMoments(x.shape[1], y.shape[1], diagonal=diagonal)
    for s in range(0, x.shape[0], block):
        m.update(x[s : s + block] - shift_x, y[s : s + block] - shift_y)
    return m


def test_covariance_equals_torch_cov():
    x, y = _traces()
    m = _stream(x, y, x[0], y[0], block=32)
    full = torch.cov(torch.cat([y, x], 1).T)  # rows: variables
    expected = full[: y.shape[1], y.shape[1] :]
    assert torch.allclose(m.covariance(), expected, rtol=1e-12, atol=1e-12)


def test_correlation_equals_corrcoef_and_is_bounded():
    x, y = _traces(seed=1)
    m = _stream(x, y, x[0], y[0], block=17)
    expected = torch.corrcoef(torch.cat([y, x], 1).T)[: y.shape[1], y.shape[1] :]
    corr = m.correlation()
    assert torch.allclose(corr, expected, rtol=1e-10, atol=1e-12)
    assert corr.abs().max() <= 1.0
    # perfectly correlated traces give exactly +-1 after clamping, never beyond
    m2 = CrossMoments(1, 1)
    t = torch.linspace(0, 1, 50, dtype=torch.float64)[:, None]
    m2.update(t, 3 * t)
    assert m2.correlation().item() <= 1.0 and abs(m2.correlation().item() - 1.0) < 1e-12


def test_merge_of_chains_equals_pooled_draws():
    x, y = _traces(draws=200, seed=2)
    a = _stream(x[:90], y[:90], x[0], y[0], block=8)
    b = _stream(x[90:], y[90:], x[0], y[0], block=64)
    pooled = _stream(x, y, x[0], y[0], block=200)
    a.merge_(b)
    assert a.count == 200
    assert torch.allclose(a.covariance(), pooled.covariance(), rtol=1e-12, atol=1e-13)


def test_diagonal_moments_are_the_diagonal():
    x, _ = _traces(nx=5, seed=3)
    diag = _stream(x, x, x[0], x[0], block=10, diagonal=True)
    full = torch.cov(x.T)
    assert torch.allclose(diag.covariance(), full.diagonal(), rtol=1e-12)
    assert torch.allclose(diag.correlation(), torch.ones(5, dtype=torch.float64))


def test_constant_trace_has_zero_correlation_not_nan():
    m = CrossMoments(2, 1)
    x = torch.stack([torch.ones(10), torch.arange(10.0)], 1).double()
    m.update(x, torch.arange(10.0).double()[:, None])
    corr = m.correlation()
    assert torch.isfinite(corr).all() and corr[0, 0] == 0.0


def test_state_dict_roundtrip():
    x, y = _traces(seed=4)
    m = _stream(x, y, x[0], y[0], block=50)
    m2 = CrossMoments.from_state_dict(m.state_dict())
    assert torch.equal(m.covariance(), m2.covariance())
