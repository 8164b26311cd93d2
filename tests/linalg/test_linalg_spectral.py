"""Lanczos, eigsh, power iteration and the spectral density against dense eigensolvers."""

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
    Dense,
    Kronecker,
    LanczosResult,
    eigsh,
    lanczos,
    power_iteration,
    spectral_density,
)


def sym_with_spectrum(lam, g):
    Q = random_orthonormal(len(lam), len(lam), g)
    M = (Q * lam) @ Q.T
    return (M + M.T) / 2


# --------------------------------------------------------------------------- Lanczos
def test_lanczos_tridiagonalises():
    g = gen(0)
    M = randn(30, 30, g=g)
    M = (M + M.T) / 2
    res = lanczos(Dense(M, symmetric=True), randn(30, g=g), 12)
    assert isinstance(res, LanczosResult)
    assert res.Q.shape == (30, 12) and res.alpha.shape == (12,) and res.beta.shape == (11,)
    torch.testing.assert_close(res.Q.T @ res.Q, torch.eye(12, dtype=F64))
    torch.testing.assert_close(res.Q.T @ M @ res.Q, res.tridiagonal())
    # Full depth: the Ritz values are the eigenvalues.
    full = lanczos(Dense(M, symmetric=True), randn(30, g=g), 30)
    theta, V = full.ritz()
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(M))
    torch.testing.assert_close(M @ V, V * theta)


def test_lanczos_stops_on_an_invariant_subspace():
    g = gen(1)
    lam = torch.tensor([-1.0] * 5 + [2.0] * 5 + [4.0] * 5, dtype=F64)
    M = sym_with_spectrum(lam, g)
    res = lanczos(Dense(M, symmetric=True), randn(15, g=g), 10)
    assert res.alpha.shape == (3,)  # three distinct eigenvalues: the Krylov space has dimension 3
    torch.testing.assert_close(res.ritz()[0], torch.tensor([-1.0, 2.0, 4.0], dtype=F64))


def test_lanczos_without_reorthogonalisation_still_tridiagonalises_short_runs():
    g = gen(2)
    M = random_spd(20, g)
    res = lanczos(Dense(M, psd=True), randn(20, g=g), 5, reorthogonalize=False)
    torch.testing.assert_close(res.Q.T @ M @ res.Q, res.tridiagonal(), atol=1e-8, rtol=1e-8)


def test_lanczos_errors():
    g = gen(3)
    op = Dense(random_spd(5, g), psd=True)
    with pytest.raises(ValueError, match="lanczos: num_matvecs must be <= n = 5; got 6"):
        lanczos(op, randn(5, g=g), 6)
    with pytest.raises(ValueError, match=r"lanczos: v0 must have shape \(5,\); got \(4,\)"):
        lanczos(op, randn(4, g=g), 2)
    with pytest.raises(ValueError, match="v0 is zero"):
        lanczos(op, torch.zeros(5, dtype=F64), 2)
    with pytest.raises(TypeError, match="v0 must have dtype torch.float64"):
        lanczos(op, torch.ones(5, dtype=torch.float32), 2)
    with pytest.raises(ValueError, match="lanczos: needs an operator declared symmetric"):
        lanczos(Dense(randn(5, 5, g=g)), randn(5, g=g), 2)


# --------------------------------------------------------------------------- eigsh
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_small(which):
    g = gen(4)
    lam = torch.cat([-torch.logspace(0, 1, 20, dtype=F64), torch.logspace(-1, 1.2, 40, dtype=F64)])
    M = sym_with_spectrum(lam, g)
    evals, evecs = eigsh(Dense(M, symmetric=True), 5, which=which, generator=gen(0))
    ref = torch.linalg.eigvalsh(M)
    if which == "LA":
        expected = ref.flip(0)[:5]
    elif which == "SA":
        expected = ref[:5]
    else:
        expected = ref[ref.abs().argsort(descending=True)][:5]
    torch.testing.assert_close(evals, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(M @ evecs, evecs * evals, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(5, dtype=F64))


def test_eigsh_top10_of_2000x2000_kronecker():
    g = gen(5)
    a, b = randn(40, 60, g=g), randn(50, 70, g=g)
    A, B = a @ a.T / 60, b @ b.T / 70
    op = CountingOperator(Kronecker((A + A.T) / 2, (B + B.T) / 2, psd=True))
    evals, evecs = eigsh(op, 10, generator=gen(1))
    ref = torch.outer(torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)).flatten()
    ref = ref.sort(descending=True).values[:10]
    assert ((evals - ref).abs() / ref).max() < 1e-6
    assert op.columns < 2000  # far fewer products than the dimension


def test_eigsh_top10_of_2000x2000_dense_with_outliers():
    # A Hessian-like spectrum: a semicircle bulk of width 2 and 20 outliers.
    g = gen(6)
    n = 2000
    G = randn(n, n, g=g) / n**0.5
    U = random_orthonormal(n, 20, g)
    M = (G + G.T) / 2**0.5 + (U * torch.linspace(3, 12, 20, dtype=F64)) @ U.T
    M = (M + M.T) / 2
    evals, _ = eigsh(Dense(M, symmetric=True), 10, generator=gen(2))
    ref = torch.linalg.eigvalsh(M).flip(0)[:10]
    assert ((evals - ref).abs() / ref.abs()).max() < 1e-6


def test_eigsh_whole_spectrum_and_failure():
    g = gen(7)
    M = random_spd(6, g)
    evals, _ = eigsh(Dense(M, psd=True), 6, generator=gen(0))
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(M).flip(0))
    big = sym_with_spectrum(torch.linspace(0, 1, 300, dtype=F64), g)
    with pytest.raises(ConvergenceError, match="eigsh: 4 eigenpairs not converged after"):
        eigsh(Dense(big, symmetric=True), 4, max_matvecs=30, generator=gen(0))


def test_eigsh_errors():
    g = gen(8)
    op = Dense(random_spd(5, g), psd=True)
    with pytest.raises(ValueError, match="eigsh: k must be <= n = 5; got 6"):
        eigsh(op, 6)
    with pytest.raises(ValueError, match="which must be 'LA', 'SA' or 'LM'; got 'BE'"):
        eigsh(op, 2, which="BE")
    with pytest.raises(ValueError, match=r"block_size must be in \[k, n\] = \[3, 5\]; got 2"):
        eigsh(op, 3, block_size=2)
    with pytest.raises(ValueError, match="eigsh: needs an operator declared symmetric"):
        eigsh(MatmatOnly(randn(5, 5, g=g)), 2)


# --------------------------------------------------------------------------- power iteration
def test_power_iteration():
    g = gen(9)
    lam = torch.cat([torch.tensor([-5.0], dtype=F64), torch.linspace(-2, 2, 29, dtype=F64)])
    M = sym_with_spectrum(lam, g)
    theta, v = power_iteration(Dense(M, symmetric=True), tol=1e-10, generator=gen(0))
    torch.testing.assert_close(theta, torch.tensor(-5.0, dtype=F64))
    torch.testing.assert_close(M @ v, theta * v, atol=1e-8, rtol=0)
    close = sym_with_spectrum(torch.tensor([1.0, -0.9999, 0.5, 0.1], dtype=F64), g)
    with pytest.raises(ConvergenceError, match="power_iteration: not converged in 10 steps"):
        power_iteration(Dense(close, symmetric=True), max_iter=10, generator=gen(0))


# --------------------------------------------------------------------------- spectral density
def bin_masses(grid, density, edges):
    """Integrate a density on a grid over bins (trapezoid rule on a refined grid)."""
    masses = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (grid >= lo) & (grid < hi)
        masses.append(
            torch.trapezoid(density[inside], grid[inside]).item() if inside.sum() > 1 else 0.0
        )
    return torch.tensor(masses, dtype=F64)


def test_spectral_density_matches_eigenvalue_histogram():
    g = gen(10)
    lam = torch.cat(
        [torch.randn(380, generator=g, dtype=F64) * 0.3, 4 + torch.rand(20, generator=g, dtype=F64)]
    )
    M = sym_with_spectrum(lam, g)
    op = CountingOperator(Dense(M, symmetric=True))
    grid, density = spectral_density(
        op, num_probes=20, num_matvecs=60, num_points=4000, kernel_width=0.005, generator=gen(1)
    )
    assert op.calls == 60  # one batched product per Lanczos step, for all probes at once
    torch.testing.assert_close(
        torch.trapezoid(density, grid), torch.tensor(1.0, dtype=F64), atol=1e-6, rtol=0
    )
    assert (density >= 0).all()
    edges = torch.tensor([-3.0, -0.6, -0.2, 0.2, 0.6, 3.0, 6.0], dtype=F64)
    est = bin_masses(grid, density, edges)
    true = torch.histogram(lam, bins=edges).hist / len(lam)
    assert (est - true).abs().max() < 0.04
    assert abs(est[-1] - 0.05) < 0.02  # the outliers carry their 5 % of the mass


def test_log_spectral_density_integrates_over_log_eigenvalues():
    g = gen(11)
    lam = torch.logspace(-6, 2, 300, dtype=F64)  # eight orders of magnitude
    M = sym_with_spectrum(lam, g)
    grid, density = spectral_density(
        Dense(M, psd=True),
        num_probes=16,
        num_matvecs=80,
        scale="log",
        kernel_width=0.01,
        epsilon=1e-9,
        generator=gen(2),
    )
    assert (grid[1:] > grid[:-1]).all() and grid.min() > -1e-9
    u = torch.log10(grid + 1e-9)
    torch.testing.assert_close(
        torch.trapezoid(density, u), torch.tensor(1.0, dtype=F64), atol=1e-6, rtol=0
    )
    # Eigenvalues are uniform in log10 between -6 and 2: each decade holds 1/8 of the mass.
    # 80 Lanczos nodes resolve the top decades; below 1e-2 · λ_max they lump the mass together
    # (a limit of the quadrature, not of the log scale), so the bottom half is checked as one.
    decades = bin_masses(u, density, torch.arange(-6.0, 3.0, dtype=F64))
    assert (decades[4:] - 1 / 8).abs().max() < 0.03
    assert abs(decades[:4].sum() - 1 / 2) < 0.03
    # At full depth the quadrature is exact per probe, and every decade is resolved.
    M = sym_with_spectrum(torch.logspace(-6, 2, 160, dtype=F64), g)
    grid, density = spectral_density(
        Dense(M, psd=True),
        num_probes=16,
        num_matvecs=160,
        scale="log",
        kernel_width=0.01,
        epsilon=1e-9,
        generator=gen(3),
    )
    decades = bin_masses(torch.log10(grid + 1e-9), density, torch.arange(-6.0, 3.0, dtype=F64))
    assert (decades - 1 / 8).abs().max() < 0.03


def test_spectral_density_errors_and_reproducibility():
    g = gen(12)
    M = sym_with_spectrum(torch.linspace(-1, 1, 30, dtype=F64), g)
    op = Dense(M, symmetric=True)
    with pytest.raises(ValueError, match="scale='log' needs a PSD operator"):
        spectral_density(op, scale="log", generator=gen(0))
    with pytest.raises(ValueError, match="scale must be 'linear' or 'log'"):
        spectral_density(op, scale="sqrt")
    with pytest.raises(ValueError, match="kernel_width must be a finite number > 0"):
        spectral_density(op, kernel_width=0.0)
    a = spectral_density(op, num_probes=3, num_matvecs=10, generator=gen(5))
    b = spectral_density(op, num_probes=3, num_matvecs=10, generator=gen(5))
    assert torch.equal(a[1], b[1])
    # Depth beyond n is capped at n (the quadrature is then exact per probe).
    grid, density = spectral_density(op, num_probes=2, num_matvecs=500, generator=gen(6))
    torch.testing.assert_close(
        torch.trapezoid(density, grid), torch.tensor(1.0, dtype=F64), atol=1e-6, rtol=0
    )
