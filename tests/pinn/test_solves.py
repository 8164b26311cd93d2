import pytest
import torch

from curvkit.pinn.jacobian import linearize
from curvkit.pinn.problems import mlp, poisson
from curvkit.pinn.solves import NYSTROM_SHIFT, damped_cholesky_solve, kernel_solve


def _lin(n_in, n_bd, hidden=(5, 4)):
    problem = poisson(2)
    g = torch.Generator().manual_seed(0)
    model = mlp(2, hidden, generator=g)
    return linearize(model, problem, problem.sample(n_in, n_bd, generator=g))


def _exact(lin, rhs, lam):
    J = lin.to_dense()
    return torch.linalg.solve(J @ J.T + lam * torch.eye(J.shape[0]), rhs)


@pytest.mark.parametrize("solver", ["nystrom", "nystrom_stable", "nystrom_pcg"])
def test_nystrom_solves_converge_to_the_exact_solve(solver):
    lin = _lin(50, 30, hidden=(12, 10))  # N = 80 < P = 179: K has full rank
    lam = 1e-3
    rhs = -lin.residual
    # the fast variant approximates K + νI (ν = 1e-7, not removed, as in the reference code)
    exact = _exact(lin, rhs, lam + (NYSTROM_SHIFT if solver == "nystrom" else 0.0))
    errors = []
    for rank in (5, 20, 50, 80):
        u = kernel_solve(lin, rhs, damping=lam, solver=solver, rank=rank,
                         generator=torch.Generator().manual_seed(rank))
        errors.append(float((u - exact).norm() / exact.norm()))
    # decreasing until rounding level (PCG reaches it early: the spectrum decays fast)
    assert all(b < a or b < 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3  # a small sketch is genuinely approximate
    assert errors[-1] < 1e-8, errors  # l = N: exact


def test_nystrom_is_exact_for_a_low_rank_kernel():
    lin = _lin(70, 30)  # N = 100 > P = 44: rank(K) <= 44
    lam = 1e-2
    rhs = -lin.residual
    exact = _exact(lin, rhs, lam)
    for solver in ("nystrom_stable", "nystrom"):
        u = kernel_solve(lin, rhs, damping=lam, solver=solver, rank=60, shift=1e-14,
                         generator=torch.Generator().manual_seed(0))
        assert (u - exact).norm() <= 1e-8 * exact.norm(), solver


def test_precomputed_kernel_gives_the_same_solve():
    lin = _lin(20, 10)
    rhs = -lin.residual
    K = lin.to_dense() @ lin.to_dense().T
    for solver, rank in (("cholesky", None), ("nystrom_pcg", 10)):
        a = kernel_solve(lin, rhs, damping=1e-3, solver=solver, rank=rank,
                         generator=torch.Generator().manual_seed(0))
        b = kernel_solve(lin, rhs, damping=1e-3, solver=solver, rank=rank, kernel=K,
                         generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_cholesky_retries_with_more_damping_and_warns():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 3, generator=g)
    M = A @ A.T - 1e-9 * torch.eye(6)  # slightly indefinite: Cholesky with λ = 0 fails
    b = torch.randn(6, generator=g)
    with pytest.warns(RuntimeWarning, match="solved with damping"):
        x = damped_cholesky_solve(M, b, 0.0, caller="test")
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="test: damping must be >= 0"):
        damped_cholesky_solve(M, b, -1.0, caller="test")
    with pytest.raises(ValueError, match="not positive definite even with damping"):
        damped_cholesky_solve(-1e9 * torch.eye(3), b[:3], 1e-3, caller="test")


def test_bad_solver_options_raise():
    lin = _lin(5, 5)
    with pytest.raises(ValueError, match="solver must be one of"):
        kernel_solve(lin, lin.residual, damping=1.0, solver="qr")
    with pytest.raises(ValueError, match=r"needs rank in \[1, N=10\]"):
        kernel_solve(lin, lin.residual, damping=1.0, solver="nystrom", rank=11)
    with pytest.raises(ValueError, match="needs damping > 0"):
        kernel_solve(lin, lin.residual, damping=0.0, solver="nystrom", rank=3)


def test_damped_cholesky_solve_leaves_the_matrix_unchanged():
    """The damping is added to the diagonal in place and restored bit for bit, also on failure."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 4, dtype=torch.float64, generator=g)
    M = A @ A.T  # rank 4: needs the damping
    before = M.clone()
    b = torch.randn(6, dtype=torch.float64, generator=g)
    x = damped_cholesky_solve(M, b, 1e-3, caller="test")
    assert torch.equal(M, before)
    expected = torch.linalg.solve(before + 1e-3 * torch.eye(6, dtype=torch.float64), b)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
    bad = -1e9 * torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky_solve(bad, b[:3], 1e-3, caller="test")
    assert torch.equal(bad, -1e9 * torch.eye(3, dtype=torch.float64))
