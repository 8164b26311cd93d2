"""Trace, diagonal and Frobenius-norm estimators: exact cases, unbiasedness, rates, budgets."""

import math

import pytest
import torch
from linalg_cases import F64, CountingOperator, MatmatOnly, gen, randn, random_orthonormal

from curvkit.linalg import Dense, diagonal, frobenius_norm, trace

TRACE_METHODS = ["hutchinson", "hutch++", "xtrace"]


def decaying(n, g, rate=2.0):
    Q = random_orthonormal(n, n, g)
    M = (Q * torch.arange(1, n + 1, dtype=F64) ** -rate) @ Q.T
    return (M + M.T) / 2


def low_rank(n, r, g, *, symmetric=True):
    U = randn(n, r, g=g)
    return U @ U.T if symmetric else U @ randn(r, n, g=g)


# --------------------------------------------------------------------------- exact cases
def test_rademacher_hutchinson_is_exact_on_diagonal_matrices():
    d = torch.linspace(-2, 3, 20, dtype=F64)
    op = MatmatOnly(torch.diag(d), symmetric=True)
    torch.testing.assert_close(trace(op, num_matvecs=1, generator=gen(0)), d.sum())
    torch.testing.assert_close(diagonal(op, num_matvecs=1, generator=gen(0)), d)
    torch.testing.assert_close(frobenius_norm(op, num_matvecs=1, generator=gen(0)), d.norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_sketching_estimators_are_exact_below_their_sketch_size(symmetric):
    g = gen(1)
    M = low_rank(40, 5, g, symmetric=symmetric)
    op = MatmatOnly(M, symmetric=symmetric)
    # Hutch++ sketches m/3 = 6 >= 5 directions; XTrace/XDiag use m/2 = 8 > 5 + 1 probes.
    torch.testing.assert_close(trace(op, method="hutch++", num_matvecs=18, generator=g), M.trace())
    for dist in ("rademacher", "normal"):
        torch.testing.assert_close(
            trace(op, method="xtrace", num_matvecs=16, distribution=dist, generator=g), M.trace()
        )
        torch.testing.assert_close(
            diagonal(op, method="xdiag", num_matvecs=16, distribution=dist, generator=g),
            M.diagonal(),
        )


# --------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("method", TRACE_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_trace_estimators_are_unbiased(method, symmetric):
    g = gen(2)
    M = randn(30, 30, g=g)
    M = (M + M.T) / 2 if symmetric else M
    op = MatmatOnly(M, symmetric=symmetric)
    runs = 400
    est = torch.stack([trace(op, method=method, num_matvecs=12, generator=g) for _ in range(runs)])
    stderr = est.std() / math.sqrt(runs)
    assert (est.mean() - M.trace()).abs() < 4 * stderr
    assert est.std() > 0  # the test can fail: the estimates do vary


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimators_are_unbiased(method):
    g = gen(3)
    M = randn(15, 15, g=g)
    op = MatmatOnly(M)
    runs = 400
    est = torch.stack(
        [diagonal(op, method=method, num_matvecs=10, generator=g) for _ in range(runs)]
    )
    z = (est.mean(0) - M.diagonal()) / (est.std(0) / math.sqrt(runs))
    assert z.abs().max() < 4.5  # 15 entries, each within 4.5 standard errors


def test_squared_frobenius_estimate_is_unbiased():
    g = gen(4)
    M = randn(7, 11, g=g)  # rectangular
    runs = 400
    est = torch.stack(
        [frobenius_norm(Dense(M), num_matvecs=3, generator=g) ** 2 for _ in range(runs)]
    )
    assert (est.mean() - (M**2).sum()).abs() < 4 * est.std() / math.sqrt(runs)


# --------------------------------------------------------------------------- accuracy and rates
def rmse(op, ref, runs, seed, **kwargs):
    g = gen(seed)
    est = torch.stack([trace(op, generator=g, **kwargs) for _ in range(runs)])
    return ((est - ref) ** 2).mean().sqrt().item()


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum():
    g = gen(5)
    M = decaying(100, g, rate=2.0)
    op = Dense(M, psd=True)
    errs = {m: rmse(op, M.trace(), 60, 6, method=m, num_matvecs=30) for m in TRACE_METHODS}
    assert errs["hutch++"] < errs["hutchinson"] / 5
    assert errs["xtrace"] < errs["hutchinson"] / 5
    assert errs["xtrace"] <= errs["hutch++"] * 1.5


def test_hutchinson_converges_at_rate_one_over_sqrt_m():
    g = gen(7)
    M = randn(50, 50, g=g)
    M = (M + M.T) / 2
    op = Dense(M, symmetric=True)
    e16 = rmse(op, M.trace(), 200, 8, num_matvecs=16)
    e256 = rmse(op, M.trace(), 200, 9, num_matvecs=256)
    # Theory: RMSE = sqrt(2 (‖M‖_F² − Σ M_ii²) / m) for Rademacher probes; the ratio is 4.
    theory = math.sqrt(2 * ((M**2).sum() - (M.diagonal() ** 2).sum()).item() / 16)
    assert 0.8 * theory < e16 < 1.25 * theory
    assert 3.0 < e16 / e256 < 5.3


def test_hutchpp_converges_faster_than_sqrt_m_on_psd_with_decay():
    g = gen(10)
    M = decaying(120, g, rate=1.5)
    op = Dense(M, psd=True)
    e_small = rmse(op, M.trace(), 60, 11, method="hutch++", num_matvecs=12)
    e_large = rmse(op, M.trace(), 60, 12, method="hutch++", num_matvecs=96)
    assert e_small / e_large > 2 * math.sqrt(8)  # better than the m^{-1/2} rate by a margin


def test_xdiag_beats_hutchinson_on_low_rank_plus_noise():
    g = gen(13)
    M = low_rank(60, 8, g) + 0.01 * torch.eye(60, dtype=F64)
    op = Dense(M, psd=True)
    errs = {}
    for method in ("hutchinson", "xdiag"):
        gg = gen(14)
        est = torch.stack(
            [diagonal(op, method=method, num_matvecs=40, generator=gg) for _ in range(20)]
        )
        errs[method] = (est - M.diagonal()).norm(dim=1).mean().item()
    assert errs["xdiag"] < errs["hutchinson"] / 10


# --------------------------------------------------------------------------- budgets, seeds
@pytest.mark.parametrize(
    ("method", "calls", "columns"), [("hutchinson", 1, 12), ("hutch++", 3, 12), ("xtrace", 2, 12)]
)
def test_trace_spends_its_budget_in_batched_products(method, calls, columns):
    op = CountingOperator(Dense(decaying(30, gen(15)), psd=True))
    trace(op, method=method, num_matvecs=12, generator=gen(0))
    assert op.calls == calls and op.columns == columns


def test_diagonal_and_norm_budgets():
    op = CountingOperator(Dense(decaying(30, gen(16)), psd=True))
    diagonal(op, method="xdiag", num_matvecs=12, generator=gen(0))
    assert op.calls == 2 and op.columns == 12
    op = CountingOperator(Dense(decaying(30, gen(16)), psd=True))
    frobenius_norm(op, num_matvecs=7, generator=gen(0))
    assert op.calls == 1 and op.columns == 7


def test_generator_makes_estimates_reproducible():
    op = Dense(decaying(20, gen(17)), psd=True)
    for method in TRACE_METHODS:
        a = trace(op, method=method, num_matvecs=9, generator=gen(3))
        b = trace(op, method=method, num_matvecs=9, generator=gen(3))
        c = trace(op, method=method, num_matvecs=9, generator=gen(4))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_estimator_errors():
    op = Dense(torch.eye(4, dtype=F64), psd=True)
    with pytest.raises(ValueError, match=r"trace: needs a square operator; got shape \(3, 4\)"):
        trace(Dense(torch.ones(3, 4, dtype=F64)), num_matvecs=3)
    with pytest.raises(
        ValueError, match=r"unknown trace method 'xdiag'; expected one of \['hutch\+\+', "
    ):
        trace(op, method="xdiag", num_matvecs=3)
    with pytest.raises(
        ValueError, match=r"trace \(method='xtrace'\): num_matvecs must be an integer >= 4; got 3"
    ):
        trace(op, method="xtrace", num_matvecs=3)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 3; got 2"):
        trace(op, method="hutch++", num_matvecs=2)
    with pytest.raises(ValueError, match="unknown probe distribution 'uniform'"):
        trace(op, num_matvecs=3, distribution="uniform")
    with pytest.raises(ValueError, match="unknown diagonal method 'xtrace'"):
        diagonal(op, method="xtrace", num_matvecs=4)
    with pytest.raises(TypeError, match="frobenius_norm: expected a curvkit.linalg.LinearOperator"):
        frobenius_norm(torch.eye(3), num_matvecs=3)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_estimators_on_tiny_operators(n):
    M = randn(n, n, g=gen(18))
    op = MatmatOnly(M)
    torch.testing.assert_close(
        trace(op, method="xtrace", num_matvecs=2 * n + 2, generator=gen(0)), M.trace()
    )
    torch.testing.assert_close(
        diagonal(op, method="xdiag", num_matvecs=max(4, 2 * n), generator=gen(0)), M.diagonal()
    )
    torch.testing.assert_close(
        trace(op, method="hutch++", num_matvecs=3 * n, generator=gen(0)), M.trace()
    )
    assert torch.isfinite(trace(op, num_matvecs=3, generator=gen(0)))
