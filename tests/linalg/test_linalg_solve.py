"""Solvers against dense float64 solves: CG, MINRES, LSMR, Neumann, Nyström, Nyström-PCG."""

import pytest
import torch
from linalg_cases import (
    F64,
    CountingOperator,
    MatmatOnly,
    gen,
    randn,
    random_orthonormal,
    random_spd,
)

from curvkit.linalg import (
    ConvergenceError,
    ConvergenceWarning,
    Dense,
    LowRank,
    SolveResult,
    cg,
    lsmr,
    minres,
    neumann,
    nystrom,
    nystrom_pcg,
)


def eye(n):
    return torch.eye(n, dtype=F64)


def decaying_psd(n, g, *, rate=1.0, rank=None):
    """``Q diag(j^-rate) Qᵀ`` (optionally of low rank), with its dense matrix."""
    r = n if rank is None else rank
    Q = random_orthonormal(n, r, g)
    lam = torch.arange(1, r + 1, dtype=F64) ** -rate
    M = (Q * lam) @ Q.T
    return Dense((M + M.T) / 2, psd=True), (M + M.T) / 2


# --------------------------------------------------------------------------- CG
def test_cg_matches_dense_solve_in_every_form():
    g = gen(0)
    A = random_spd(12, g)
    op = Dense(A, psd=True)
    b, B = randn(12, g=g), randn(12, 4, g=g)
    torch.testing.assert_close(cg(op, b, rtol=1e-12), torch.linalg.solve(A, b))
    torch.testing.assert_close(cg(op, B, rtol=1e-12), torch.linalg.solve(A, B))
    torch.testing.assert_close(
        cg(op, B, damping=0.7, rtol=1e-12), torch.linalg.solve(A + 0.7 * eye(12), B)
    )
    x0 = torch.linalg.solve(A, b) + 1e-3 * randn(12, g=g)
    info = cg(op, b, x0=x0, rtol=1e-12, return_info=True)
    torch.testing.assert_close(info.x, torch.linalg.solve(A, b))
    # Parameter lists in, parameter lists out.
    shaped = MatmatOnly(A, symmetric=True, in_shapes=[(3, 2), (6,)])
    x = cg(shaped, [b[:6].reshape(3, 2), b[6:]], rtol=1e-12)
    assert [tuple(t.shape) for t in x] == [(3, 2), (6,)]
    torch.testing.assert_close(torch.cat([t.flatten() for t in x]), torch.linalg.solve(A, b))


def test_cg_is_batched_over_columns_and_reports():
    g = gen(1)
    A = random_spd(30, g, shift=0.1)
    op = CountingOperator(Dense(A, psd=True))
    B = randn(30, 8, g=g)
    B[:, 0] = torch.linalg.eigh(A).eigenvectors[:, 0]  # converges in one iteration
    info = cg(op, B, rtol=1e-10, return_info=True)
    assert isinstance(info, SolveResult) and info.converged
    # One product per iteration for all 8 columns, never one per column, and one at the end
    # that checks the true residuals of all of them (the first converged long before).
    assert op.calls == info.iterations + 1
    assert info.residual_norm.shape == (8,)
    true_res = (B - A @ info.x).norm(dim=0)
    assert (true_res <= 1e-9 * B.norm(dim=0)).all()
    torch.testing.assert_close(info.residual_norm, true_res, rtol=1e-3, atol=1e-12)
    # Converged columns drop out: later products use fewer columns.
    assert op.columns < 8 * info.iterations or info.iterations <= 1
    scalar = cg(Dense(A, psd=True), B[:, 0], return_info=True)
    assert scalar.residual_norm.shape == ()


def test_cg_preconditioner_cuts_iterations():
    g = gen(2)
    scales = torch.logspace(0, 4, 40, dtype=F64)
    A = random_spd(40, g) * torch.outer(scales, scales).sqrt()  # badly scaled rows/columns
    A = (A + A.T) / 2
    b = randn(40, g=g)
    plain = cg(Dense(A, psd=True), b, rtol=1e-10, return_info=True)
    jacobi = Dense(torch.diag(1 / A.diagonal()), psd=True)
    pre = cg(Dense(A, psd=True), b, rtol=1e-10, preconditioner=jacobi, return_info=True)
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b))
    assert pre.iterations < plain.iterations / 2


def test_cg_failure_modes():
    g = gen(3)
    A = random_spd(20, g, shift=1e-3)
    b = randn(20, g=g)
    with pytest.raises(
        ConvergenceError, match=r"cg: did not converge in 2 iterations: residual norm"
    ):
        cg(Dense(A, psd=True), b, max_iter=2)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        info = cg(Dense(A, psd=True), b, max_iter=2, on_failure="warn", return_info=True)
    assert not info.converged and info.iterations == 2
    indefinite = Dense(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64)), symmetric=True)
    with pytest.raises(ValueError, match="non-positive curvature"):
        cg(indefinite, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="cg: needs an operator declared symmetric"):
        cg(Dense(randn(3, 3, g=g)), torch.ones(3, dtype=F64))
    with pytest.raises(
        ValueError, match=r"cg: right-hand side: .*expected an operand of shape \(20,\)"
    ):
        cg(Dense(A, psd=True), torch.ones(19, dtype=F64))
    with pytest.raises(
        TypeError, match="cg: right-hand side: .*expected operand dtype torch.float64"
    ):
        cg(Dense(A, psd=True), torch.ones(20, dtype=torch.float32))
    with pytest.raises(ValueError, match="cg: needs a square operator"):
        cg(Dense(randn(3, 4, g=g)), torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="cg: expected a curvkit.linalg.LinearOperator; got Tensor"):
        cg(A, b)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0; got -1"):
        cg(Dense(A, psd=True), b, rtol=-1)
    with pytest.raises(ValueError, match=r"preconditioner must have shape \(20, 20\)"):
        cg(Dense(A, psd=True), b, preconditioner=Dense(eye(3), psd=True))
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'warn'"):
        cg(Dense(A, psd=True), b, max_iter=1, on_failure="ignore")


def test_cg_zero_rhs_returns_zero_without_products():
    op = CountingOperator(Dense(eye(4), psd=True))
    info = cg(op, torch.zeros(4, 2, dtype=F64), return_info=True)
    assert info.iterations == 0 and op.calls == 0
    torch.testing.assert_close(info.x, torch.zeros(4, 2, dtype=F64))


# --------------------------------------------------------------------------- MINRES
def test_minres_solves_indefinite_systems():
    g = gen(4)
    Q = random_orthonormal(25, 25, g)
    lam = torch.cat([-torch.linspace(1, 5, 10, dtype=F64), torch.linspace(0.5, 8, 15, dtype=F64)])
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    B = randn(25, 3, g=g)
    op = CountingOperator(Dense(A, symmetric=True))
    info = minres(op, B, rtol=1e-11, return_info=True)
    torch.testing.assert_close(info.x, torch.linalg.solve(A, B))
    # 25 here, as in exact arithmetic (25 eigenvalues); another CPU's round-off may add one,
    # and a restart after a missed true-residual check one more product
    assert 25 <= info.iterations <= 26
    assert op.calls - info.iterations in (1, 2)  # one batched product checks the true residuals
    torch.testing.assert_close(
        info.residual_norm, (B - A @ info.x).norm(dim=0), rtol=1e-3, atol=1e-10
    )
    x = minres(Dense(A, symmetric=True), B[:, 0], damping=0.25, rtol=1e-11)
    torch.testing.assert_close(x, torch.linalg.solve(A + 0.25 * eye(25), B[:, 0]))
    with pytest.raises(ConvergenceError, match="minres: did not converge in 3 iterations"):
        minres(Dense(A, symmetric=True), B, max_iter=3)


def test_minres_exact_in_small_krylov_space():
    # Three distinct eigenvalues: MINRES is exact after three iterations.
    g = gen(5)
    Q = random_orthonormal(9, 9, g)
    lam = torch.tensor([-2.0, -2, -2, 1, 1, 1, 3, 3, 3], dtype=F64)
    A = (Q * lam) @ Q.T
    info = minres(Dense((A + A.T) / 2, symmetric=True), randn(9, g=g), rtol=1e-12, return_info=True)
    assert info.iterations <= 4 and info.converged


# --------------------------------------------------------------------------- LSMR
def test_lsmr_least_squares():
    g = gen(6)
    M = randn(30, 12, g=g)
    B = randn(30, 2, g=g)
    op = CountingOperator(Dense(M))
    info = lsmr(op, B, atol=1e-12, btol=1e-12, return_info=True)
    torch.testing.assert_close(info.x, torch.linalg.lstsq(M, B).solution)
    assert info.converged and op.calls == 2 * info.iterations + 1  # A and Aᵀ per iteration
    # Damped: the solution of (MᵀM + λI) x = Mᵀ b.
    x = lsmr(Dense(M), B[:, 0], damping=0.8, atol=1e-12, btol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(M.T @ M + 0.8 * eye(12), M.T @ B[:, 0]))


def test_lsmr_underdetermined_gives_minimum_norm_solution():
    g = gen(7)
    M = randn(6, 15, g=g)
    b = randn(6, g=g)
    x = lsmr(MatmatOnly(M), b, atol=1e-12, btol=1e-12)
    torch.testing.assert_close(x, torch.linalg.pinv(M) @ b)


def test_lsmr_matches_scipy():
    import scipy.sparse.linalg

    g = gen(8)
    M = randn(40, 20, g=g) @ torch.diag(torch.logspace(0, 3, 20, dtype=F64))
    b = randn(40, g=g)
    ours = lsmr(Dense(M), b, atol=1e-10, btol=1e-10, return_info=True)
    ref = scipy.sparse.linalg.lsmr(M.numpy(), b.numpy(), atol=1e-10, btol=1e-10, maxiter=500)
    assert ref[1] in (1, 2)  # SciPy converged
    torch.testing.assert_close(ours.x, torch.from_numpy(ref[0]), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.x, torch.linalg.lstsq(M, b).solution, rtol=1e-8, atol=1e-10)
    assert abs(ours.iterations - ref[2]) <= 2


def test_lsmr_failure():
    g = gen(9)
    M = randn(30, 20, g=g) @ torch.diag(torch.logspace(0, 4, 20, dtype=F64))
    with pytest.raises(ConvergenceError, match="lsmr: did not converge in 2 iterations"):
        lsmr(Dense(M), randn(30, g=g), max_iter=2)


# --------------------------------------------------------------------------- Neumann
def test_neumann_converges_to_the_damped_solve():
    g = gen(10)
    A = random_spd(10, g)
    lam_max = torch.linalg.eigvalsh(A).max().item()
    B = randn(10, 2, g=g)
    ref = torch.linalg.solve(A + 0.5 * eye(10), B)
    info = neumann(
        Dense(A, psd=True),
        B,
        damping=0.5,
        alpha=1.0 / (lam_max + 0.5),
        num_terms=400,
        return_info=True,
    )
    torch.testing.assert_close(info.x, ref)
    # The reported residual is the exact residual of the returned x.
    torch.testing.assert_close(info.residual_norm, (B - (A + 0.5 * eye(10)) @ info.x).norm(dim=0))
    # Truncation error shrinks geometrically with the number of terms.
    errs = [
        (
            neumann(Dense(A, psd=True), B, damping=0.5, alpha=1.0 / (lam_max + 0.5), num_terms=k)
            - ref
        ).norm()
        for k in (5, 20, 80)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_neumann_tolerance_and_divergence():
    g = gen(11)
    A = random_spd(8, g)
    lam_max = torch.linalg.eigvalsh(A).max().item()
    b = randn(8, g=g)
    info = neumann(
        Dense(A, psd=True), b, alpha=1 / lam_max, num_terms=10_000, rtol=1e-8, return_info=True
    )
    assert info.converged and info.iterations < 10_000
    assert info.residual_norm <= 1e-8 * b.norm()
    with pytest.raises(ConvergenceError, match="neumann: did not converge in 3 iterations"):
        neumann(Dense(A, psd=True), b, alpha=1 / lam_max, num_terms=2, rtol=1e-8)
    with pytest.raises(ValueError, match="the series diverged"):
        neumann(Dense(A, psd=True), b, alpha=100 / lam_max, num_terms=5000)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        neumann(Dense(A, psd=True), b, alpha=0.0)


# --------------------------------------------------------------------------- Nyström
@pytest.mark.parametrize("method", ["stable", "fast"])
def test_nystrom_is_exact_on_low_rank_psd(method):
    g = gen(12)
    op, M = decaying_psd(30, g, rank=4)
    approx = nystrom(op, 6, method=method, generator=gen(0))
    assert isinstance(approx, LowRank) and approx.is_symmetric
    torch.testing.assert_close(approx.to_dense(), M, atol=1e-10, rtol=0)


def test_nystrom_error_decreases_with_rank_and_matches_at_full_rank():
    g = gen(13)
    op, M = decaying_psd(40, g, rate=2.0)
    errs = [(nystrom(op, r, generator=gen(1)).to_dense() - M).norm() for r in (2, 8, 20)]
    assert errs[0] > errs[1] > errs[2]
    # Near-optimal: within a small factor of the best rank-r approximation's error.
    lam = torch.arange(1, 41, dtype=F64) ** -2.0
    assert errs[1] < 10 * lam[8:].norm()
    torch.testing.assert_close(nystrom(op, 40, generator=gen(2)).to_dense(), M, atol=1e-9, rtol=0)


def test_nystrom_inverse_converges_to_exact_solve_as_sketch_grows():
    g = gen(14)
    op, M = decaying_psd(50, g, rate=1.5)
    b = randn(50, g=g)
    exact = torch.linalg.solve(M + 1e-2 * eye(50), b)
    errs = [
        (nystrom(op, r, generator=gen(3)).inverse(1e-2) @ b - exact).norm() / exact.norm()
        for r in (5, 20, 50)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_nystrom_errors():
    g = gen(15)
    op, _ = decaying_psd(10, g)
    with pytest.raises(ValueError, match="nystrom: rank must be <= n = 10; got 11"):
        nystrom(op, 11)
    with pytest.raises(ValueError, match="nystrom: rank must be an integer >= 1; got 0"):
        nystrom(op, 0)
    with pytest.raises(ValueError, match="method must be 'stable' or 'fast'"):
        nystrom(op, 2, method="qr")
    indefinite = Dense(torch.diag(torch.linspace(-1, 1, 10, dtype=F64)), symmetric=True)
    with pytest.raises(ValueError, match="A is not PSD"):
        nystrom(indefinite, 10, generator=gen(0))
    with pytest.raises(ValueError, match="nystrom: needs an operator declared symmetric"):
        nystrom(Dense(randn(4, 4, g=g)), 2)


def test_nystrom_pcg_converges_faster_than_cg():
    g = gen(16)
    op, M = decaying_psd(200, g, rate=2.0)
    B = randn(200, 2, g=g)
    damping = 1e-6
    ref = torch.linalg.solve(M + damping * eye(200), B)
    plain = cg(op, B, damping=damping, rtol=1e-8, return_info=True)
    pre = nystrom_pcg(
        op, B, rank=40, damping=damping, rtol=1e-8, generator=gen(4), return_info=True
    )
    torch.testing.assert_close(pre.x, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert pre.iterations < plain.iterations / 2.5
    with pytest.raises(ValueError, match="smallest Nyström eigenvalue plus damping"):
        nystrom_pcg(
            decaying_psd(10, g, rank=2)[0], torch.ones(10, dtype=F64), rank=4, generator=gen(0)
        )
    # a sketch wider than the rank of A factors with a larger shift, passed through
    low, M_low = decaying_psd(10, g, rank=2)
    b = torch.ones(10, dtype=F64)
    x = nystrom_pcg(low, b, rank=6, damping=1e-2, shift=1e-6, rtol=1e-12, generator=gen(0))
    torch.testing.assert_close(x, torch.linalg.solve(M_low + 1e-2 * eye(10), b))


def test_solve_operator_keeps_parameter_shapes_and_moves():
    g = gen(17)
    A = random_spd(7, g)
    op = MatmatOnly(A, symmetric=True, in_shapes=[(2, 2), (3,)])
    op.is_psd = True
    inv = op.inverse(damping=0.2, rtol=1e-12)
    assert inv.in_shapes == op.in_shapes and inv.shape == (7, 7)
    b = [randn(2, 2, g=g), randn(3, g=g)]
    x = inv @ b
    flat = torch.cat([t.flatten() for t in b])
    ref = torch.linalg.solve(A + 0.2 * eye(7), flat)
    assert [tuple(t.shape) for t in x] == [(2, 2), (3,)]
    torch.testing.assert_close(torch.cat([t.flatten() for t in x]), ref)
    # Structured operators keep their exact inverse; a sum falls back on the solver.
    total = Dense(A, psd=True) + Dense(eye(7), psd=True)
    torch.testing.assert_close(
        total.inverse(0.1, rtol=1e-12) @ flat, torch.linalg.solve(A + 1.1 * eye(7), flat)
    )
    with pytest.raises(
        TypeError, match="return_info and x0 are not options of an inverse operator"
    ):
        op.inverse(return_info=True)
