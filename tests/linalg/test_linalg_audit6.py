"""Audit 6: eigsh on singular and degenerate spectra, SLQ of a single eigenvalue, power
iteration's input checks, and the precision of SymmetricEigen.pow."""

import pytest
import torch
from linalg_cases import F64, gen, randn, random_orthonormal

from curvkit.linalg import Dense, SymmetricEigen, eigsh, power_iteration, spectral_density


def sym_with_spectrum(lam, g):
    Q = random_orthonormal(len(lam), len(lam), g)
    M = (Q * lam) @ Q.T
    return (M + M.T) / 2


def check_eigenpairs(M, evals, evecs, expected, tol=1e-8):
    k = len(expected)
    scale = torch.linalg.eigvalsh(M).abs().max()
    torch.testing.assert_close(evals, expected, rtol=0, atol=tol * scale)
    assert (M @ evecs - evecs * evals).norm(dim=0).max() <= 10 * tol * scale
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- eigsh
@pytest.mark.parametrize("which", ["SA", "LM"])
def test_eigsh_smallest_eigenvalues_of_a_singular_operator(which):
    # A rank-10 PSD operator (a GGN-like spectrum): its 50 smallest eigenvalues are zero. The
    # residual test was relative to the kept Ritz values, all at rounding level for "SA", so
    # it never passed and eigsh raised ConvergenceError.
    g = gen(0)
    U = randn(60, 10, g=g)
    M = U @ U.T
    M = (M + M.T) / 2
    op = Dense(M, symmetric=True)
    if which == "SA":
        evals, evecs = eigsh(op, 3, which="SA", generator=gen(1))
        check_eigenpairs(M, evals, evecs, torch.zeros(3, dtype=F64))
    else:  # the control: the nonzero end still works
        evals, evecs = eigsh(op, 3, which="LM", generator=gen(1))
        check_eigenpairs(M, evals, evecs, torch.linalg.eigvalsh(M).flip(0)[:3])


def test_eigsh_largest_magnitude_is_not_fooled_by_a_multiple_eigenvalue():
    # 25 copies of 1 in n = 30: the random start block (9 columns) holds exact eigenvectors of
    # 1, whose residuals are zero; eigsh accepted them as the largest in magnitude and
    # returned 1 instead of -2.
    lam = torch.tensor([-2.0] * 5 + [1.0] * 25, dtype=F64)
    M = sym_with_spectrum(lam, gen(2))
    evals, evecs = eigsh(Dense(M, symmetric=True), 1, which="LM", generator=gen(3))
    check_eigenpairs(M, evals, evecs, torch.tensor([-2.0], dtype=F64))


def test_eigsh_k_close_to_n_with_multiple_eigenvalues():
    # k = 10 of n = 21 (block size 20): all but one direction of the start block are exact
    # eigenvectors, so the wanted ones "converged" with the wrong multiplicities.
    lam = torch.tensor([-3.6] * 8 + [3.5] * 8 + [1.2] * 5, dtype=F64)
    M = sym_with_spectrum(lam, gen(4))
    expected = torch.tensor([-3.6] * 8 + [3.5] * 2, dtype=F64)
    for seed in range(4):
        evals, evecs = eigsh(Dense(M, symmetric=True), 10, which="LM", generator=gen(seed))
        check_eigenpairs(M, evals, evecs, expected)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_of_the_zero_operator_returns_orthonormal_vectors(which):
    # Every Krylov block of the zero operator is zero; the basis must still stay orthonormal.
    M = torch.zeros(30, 30, dtype=F64)
    evals, evecs = eigsh(Dense(M, symmetric=True), 4, which=which, generator=gen(5))
    check_eigenpairs(M + 1e-300, evals, evecs, torch.zeros(4, dtype=F64))


# --------------------------------------------------------------------------- spectral density
@pytest.mark.parametrize("scale", ["linear", "log"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_density_of_a_single_eigenvalue_integrates_to_one(scale, dtype):
    # 3·I in a rotated basis: the Ritz values differ by rounding only, and a kernel that
    # narrow made the density integrate to about 20 instead of 1.
    M = sym_with_spectrum(torch.full((20,), 3.0, dtype=F64), gen(6)).to(dtype)
    grid, density = spectral_density(
        Dense(M, symmetric=True), num_probes=4, num_matvecs=10, scale=scale, generator=gen(7)
    )
    grid, density = grid.double(), density.double()
    if scale == "log":
        eps = 1e-8 * 3.0
        grid = torch.log10(grid + eps)
    mass = torch.trapezoid(density, grid)
    torch.testing.assert_close(mass, torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-4)
    center = torch.log10(torch.tensor(3.0, dtype=F64)) if scale == "log" else 3.0
    mean = torch.trapezoid(density * grid, grid)
    assert abs(mean - center) < 1e-3  # the mass sits at the eigenvalue


# --------------------------------------------------------------------------- power iteration
def test_power_iteration_rejects_bad_start_vectors_and_tolerances():
    M = sym_with_spectrum(torch.linspace(1, 2, 5, dtype=F64), gen(8))
    op = Dense(M, symmetric=True)
    # These ran max_iter NaN steps and then blamed close eigenvalues (ConvergenceError).
    with pytest.raises(ValueError, match="power_iteration: v0 is zero"):
        power_iteration(op, v0=torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match=r"power_iteration: v0 has non-finite entries"):
        power_iteration(op, v0=torch.full((5,), float("nan"), dtype=F64))
    with pytest.raises(
        TypeError, match="power_iteration: v0 must have dtype torch.float64 on cpu; got "
    ):
        power_iteration(op, v0=torch.ones(5, dtype=torch.float32))
    for tol in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="power_iteration: tol must be a finite number >= 0"):
            power_iteration(op, tol=tol, generator=gen(0))
    theta, v = power_iteration(op, tol=1e-10, v0=torch.ones(5, dtype=F64))
    torch.testing.assert_close(theta, torch.tensor(2.0, dtype=F64))


# --------------------------------------------------------------------------- SymmetricEigen
def test_symmetric_eigen_pow_keeps_the_complement_in_float64():
    # pow() computed the complement's power through torch.tensor(float), i.e. in the default
    # dtype: float32 in user code (the suite's fixture restores float64 after the test).
    torch.set_default_dtype(torch.float32)
    g = gen(9)
    Q = random_orthonormal(6, 3, g)
    lam = torch.tensor([0.7, 1.3, 2.9], dtype=F64)
    op = SymmetricEigen(Q, lam, complement=0.3)
    ref = Q @ torch.diag(lam) @ Q.T + 0.3 * (torch.eye(6, dtype=F64) - Q @ Q.T)
    torch.testing.assert_close(op.pow(-1).to_dense(), torch.linalg.inv(ref), rtol=1e-12, atol=0)
    half = op.pow(0.5).to_dense()
    torch.testing.assert_close(half @ half, ref, rtol=1e-12, atol=1e-14)


def test_integer_options_take_numpy_integers_and_generators_are_checked():
    import numpy as np

    import curvkit.linalg as la

    A = la.Dense(torch.eye(6, dtype=torch.float64), symmetric=True)
    est = la.trace(A, method="hutchinson", num_matvecs=np.int64(4),
                   generator=torch.Generator().manual_seed(0))
    assert float(est) == pytest.approx(6.0)  # Rademacher probes: exact for the identity
    with pytest.raises(TypeError, match=r"trace: generator must be a torch.Generator or None; "
                       r"got int"):
        la.trace(A, method="hutchinson", num_matvecs=4, generator=0)
