"""Seventh audit of curvkit.linalg, second pass (interop and composition).

Each test marked "regression" failed before its fix; references are dense float64 torch/SciPy.
"""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from linalg_cases import F64, gen, randn, random_orthonormal, random_spd

from curvkit.linalg import (
    ConvergenceError,
    Dense,
    Identity,
    Kronecker,
    LowRank,
    SolveOperator,
    SymmetricEigen,
    cg,
    eigsh,
    lsmr,
    minres,
)


# --------------------------------------------------------------------------- to_scipy
def test_to_scipy_applies_a_real_operator_to_complex_input():  # regression
    # Before: the imaginary part was cast away (a torch UserWarning and a wrong product), so
    # SciPy's gmres/eigs on a complex right-hand side solved the wrong system.
    g = gen(1)
    M = randn(6, 6, g=g) + 6 * torch.eye(6, dtype=F64)
    L = Dense(M).to_scipy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(6) + 1j * rng.standard_normal(6)
    X = rng.standard_normal((6, 2)) + 1j * rng.standard_normal((6, 2))
    Mn = M.numpy()
    np.testing.assert_allclose(L.matvec(x), Mn @ x, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(L.rmatvec(x), Mn.T @ x, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(L.matmat(X), Mn @ X, rtol=1e-13, atol=1e-13)
    sol, info = sla.gmres(L, x, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(sol, np.linalg.solve(Mn, x), rtol=1e-9, atol=1e-9)


def test_to_scipy_takes_read_only_arrays_and_bfloat16_operators():  # regression
    # Before: a read-only NumPy input raised torch's non-writable-array UserWarning, and a
    # bfloat16 operator failed with NumPy's "data type 'bfloat16' not understood".
    g = gen(2)
    M = randn(5, 5, g=g)
    x = np.random.default_rng(1).standard_normal(5)
    x.flags.writeable = False
    np.testing.assert_allclose(Dense(M).to_scipy().matvec(x), M.numpy() @ x, rtol=1e-13)
    Lb = Dense(M).to(torch.bfloat16).to_scipy()
    assert Lb.dtype == np.float32
    out = Lb.matvec(np.ones(5))
    assert out.dtype == np.float32
    ref = (M.bfloat16() @ torch.ones(5, dtype=torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(out, ref)


def test_numpy_operands_are_refused_clearly_and_numpy_scalars_scale():  # regression
    A = Dense(random_spd(3, gen(16)), psd=True)
    # before: NumPy took the operator for a 0-d object array ("matmul: Input operand 1 does
    # not have enough dimensions", a ValueError)
    with pytest.raises(TypeError, match="unsupported operand"):
        np.ones(3) @ A
    with pytest.raises(TypeError, match="torch.as_tensor"):
        A @ np.ones(3)
    torch.testing.assert_close((np.float64(2.0) * A).to_dense(), 2 * A.M)
    torch.testing.assert_close((np.int64(3) * A).to_dense(), 3 * A.M)


# --------------------------------------------------------------------------- lazy algebra
def test_scaling_by_zero_or_non_finite_is_refused():  # regression
    A = Dense(random_spd(3, gen(3)), psd=True)
    with pytest.raises(ZeroDivisionError, match="division of an operator by zero"):
        A / 0  # before: Python's bare "float division by zero"
    with pytest.raises(ZeroDivisionError, match="division of an operator by zero"):
        A / torch.tensor(0.0)
    for c in (float("nan"), float("inf")):  # before: accepted, every product NaN/inf
        with pytest.raises(ValueError, match="scale factor must be finite"):
            A * c
    with pytest.raises(ValueError, match="scale factor must be finite"):
        A / 1e-320  # 1/c overflows
    torch.testing.assert_close((A / np.int64(4)).to_dense(), A.M / 4)


def test_sum_refuses_operands_with_different_parameter_shapes():  # regression
    # Before: the first operand's in_shapes won silently, so a list operand shaped for the
    # second was rejected, or one shaped for the first was split wrongly for the second.
    with pytest.raises(ValueError, match="operands declare different in_shapes"):
        Identity(6, in_shapes=[(2, 3)], dtype=F64) + Identity(6, in_shapes=[(3, 2)], dtype=F64)
    S = random_spd(6, gen(4))
    op = Identity(6, 2.0, in_shapes=[(2, 3)], dtype=F64) + Dense(S, psd=True)
    x = randn(2, 3, g=gen(5))
    (y,) = op @ [x]
    torch.testing.assert_close(y, (2 * x.reshape(-1) + S @ x.reshape(-1)).reshape(2, 3))


def test_negated_operator_keeps_eigh_and_even_logdet():  # regression
    # Before: (-A).eigh() and (-A).logdet() fell back on "has no exact ..." errors.
    S = random_spd(4, gen(19))
    evals, V = (-Dense(S, psd=True)).eigh()
    torch.testing.assert_close((V * evals) @ V.T, -S)
    torch.testing.assert_close((-2.0 * Dense(S, psd=True)).logdet(), torch.linalg.slogdet(-2 * S)[1])
    assert torch.linalg.slogdet(-2 * S)[0] > 0  # n = 4: the determinant is positive


# --------------------------------------------------------------------------- solvers
def test_cg_zero_right_hand_side_from_a_nonzero_start():  # regression
    # Before: rtol·‖0‖ = 0 could never be met from x0 ≠ 0: ConvergenceError after max_iter.
    g = gen(6)
    S = random_spd(8, g)
    B = torch.cat([randn(8, 1, g=g), torch.zeros(8, 1, dtype=F64)], 1)
    res = cg(Dense(S, psd=True), B, x0=randn(8, 2, g=g), rtol=1e-12, return_info=True)
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(S, B))
    assert torch.equal(res.x[:, 1], torch.zeros(8, dtype=F64))
    x = cg(Dense(S, psd=True), torch.zeros(8, dtype=F64), x0=randn(8, g=g))
    assert torch.equal(x, torch.zeros(8, dtype=F64))


def test_cg_checks_its_preconditioner():  # regression
    g = gen(7)
    A = Dense(random_spd(5, g), psd=True)
    b = randn(5, g=g)
    # before: a non-symmetric M ran to max_iter (ConvergenceError); a float32 M failed in matmul
    with pytest.raises(ValueError, match=r"cg \(preconditioner\): needs an operator declared"):
        cg(A, b, preconditioner=Dense(randn(5, 5, g=g)))
    with pytest.raises(TypeError, match="preconditioner must have A's dtype and device"):
        cg(A, b, preconditioner=Dense(torch.eye(5), psd=True).to(torch.float32))


@pytest.mark.parametrize(
    "call",
    [
        lambda A, b: cg(A, b),
        lambda A, b: minres(A, b),
        lambda A, b: eigsh(A, 1),
        lambda A, b: lsmr(A, b),
    ],
    ids=["cg", "minres", "eigsh", "lsmr"],
)
def test_complex_operators_are_refused(call):  # regression
    # Before: NotImplementedError deep inside ("le_cpu"/"hypot_cpu" not implemented).
    S = random_spd(4, gen(8)).to(torch.complex128)
    with pytest.raises(TypeError, match="needs a real floating-point operator"):
        call(Dense(S, psd=True), torch.ones(4, dtype=torch.complex128))


def test_cg_still_raises_on_a_truncated_solve():
    A = Dense(random_spd(6, gen(9)), psd=True)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iterations"):
        cg(A, randn(6, g=gen(10)), max_iter=1)


def test_solve_operator_checks_solver_options_at_construction():  # regression
    A = Dense(random_spd(3, gen(17)), psd=True)
    # before: accepted here, TypeError from minres at the first product
    with pytest.raises(TypeError, match=r"\['preconditioner'\] are not options of minres"):
        SolveOperator(A, method="minres", preconditioner=Identity(3, dtype=F64))
    S = SolveOperator(A, method="cg", preconditioner=Identity(3, dtype=F64), rtol=1e-12)
    b = torch.ones(3, dtype=F64)
    torch.testing.assert_close(S @ b, torch.linalg.solve(A.M, b))


# --------------------------------------------------------------------------- Kronecker
def test_kronecker_takes_blocks_of_zero_columns():  # regression
    g = gen(11)
    K = Kronecker(randn(2, 3, g=g), randn(4, 2, g=g), randn(2, 2, g=g))
    # before: "cannot reshape tensor of 0 elements into shape [-1, 0]"
    assert (K @ torch.zeros(12, 0, dtype=F64)).shape == (16, 0)
    assert (K.T @ torch.zeros(16, 0, dtype=F64)).shape == (12, 0)


def test_kronecker_refuses_symmetric_declaration_of_non_square_factors():  # regression
    # Before: accepted, and K.T returned K itself: (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ differs.
    g = gen(12)
    A, B = randn(2, 3, g=g), randn(3, 2, g=g)
    for kw in ({"symmetric": True}, {"psd": True}):
        with pytest.raises(ValueError, match="needs square factors"):
            Kronecker(A, B, **kw)
    K = Kronecker(A, B)
    torch.testing.assert_close(K.T.to_dense(), torch.kron(A, B).T)
    for method in ("inverse", "eigh", "logdet"):
        with pytest.raises(ValueError, match=f"Kronecker.{method}: needs square factors"):
            getattr(K, method)()


def test_kronecker_damped_inverse_of_non_symmetric_factors_names_itself():  # regression
    g = gen(13)
    K = Kronecker(randn(2, 2, g=g) + 3 * torch.eye(2, dtype=F64), randn(3, 3, g=g))
    # before: "Kronecker.eigh: needs a symmetric operator", a method the caller never called
    with pytest.raises(ValueError, match="Kronecker.inverse: damping > 0 needs symmetric"):
        K.inverse(0.1)


def test_kronecker_of_three_non_symmetric_factors_matches_torch_kron():
    g = gen(14)
    fs = [randn(s, s, g=g) + 4 * torch.eye(s, dtype=F64) for s in (2, 3, 2)]
    ref = torch.kron(torch.kron(fs[0], fs[1]), fs[2])
    K = Kronecker(*fs)
    X = randn(12, 3, g=g)
    torch.testing.assert_close(K @ X, ref @ X)
    torch.testing.assert_close(K.T @ X, ref.T @ X)
    torch.testing.assert_close(K.inverse() @ X, torch.linalg.solve(ref, X))
    torch.testing.assert_close(K.trace(), ref.trace())
    torch.testing.assert_close(K.diagonal(), ref.diagonal())
    torch.testing.assert_close(K.logdet(), torch.linalg.slogdet(ref)[1])
    assert torch.linalg.slogdet(ref)[0] > 0


# --------------------------------------------------------------------------- SymmetricEigen
def test_symmetric_eigen_eigh_includes_the_complement():  # regression
    # Before: eigh returned the thin pair (λ, Q) and dropped c (I − Q Qᵀ), so e.g. the damped
    # inverse of a LowRank reported r of n eigenvalues and Q diag(λ) Qᵀ ≠ the operator.
    g = gen(15)
    Q = random_orthonormal(7, 3, g)
    lam = torch.tensor([4.0, 2.0, 0.5], dtype=F64)
    ref = (Q * lam) @ Q.T + 1.5 * (torch.eye(7, dtype=F64) - Q @ Q.T)
    evals, V = SymmetricEigen(Q, lam, complement=1.5).eigh()
    torch.testing.assert_close((V * evals) @ V.T, ref)
    torch.testing.assert_close(V.T @ V, torch.eye(7, dtype=F64))
    torch.testing.assert_close(evals.sort().values, torch.linalg.eigvalsh(ref))

    U = randn(7, 2, g=g)
    dense = U @ torch.diag(torch.tensor([3.0, 1.0], dtype=F64)) @ U.T
    evals, V = LowRank(U, torch.tensor([3.0, 1.0], dtype=F64)).inverse(0.25).eigh()
    inv_ref = torch.linalg.inv(dense + 0.25 * torch.eye(7, dtype=F64))
    torch.testing.assert_close((V * evals) @ V.T, inv_ref)
    torch.testing.assert_close(evals.sort().values, torch.linalg.eigvalsh(inv_ref))
