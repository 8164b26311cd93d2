"""Shared cases and the conformance check for curvkit.linalg tests.

Every case returns an operator together with a dense float64 reference built *independently*
of the code under test (``torch.kron``, ``torch.block_diag``, explicit products), never from
the operator's own ``to_dense()``.
"""

from __future__ import annotations

import numpy as np
import torch

from curvkit.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    SymmetricEigen,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def random_spd(n: int, g, *, shift: float = 0.5) -> torch.Tensor:
    M = randn(n, n + 2, g=g)
    S = M @ M.T / (n + 2) + shift * torch.eye(n, dtype=F64)
    return (S + S.T) / 2  # exactly symmetric, so that symmetry inference can see it


def random_sym(n: int, g) -> torch.Tensor:
    M = randn(n, n, g=g)
    return (M + M.T) / 2


def random_orthonormal(n: int, r: int, g) -> torch.Tensor:
    Q, _ = torch.linalg.qr(randn(n, r, g=g))
    return Q


class MatmatOnly(LinearOperator):
    """A generic operator that knows only its products (no structure)."""

    def __init__(self, M: torch.Tensor, *, symmetric: bool = False, in_shapes=None):
        super().__init__(tuple(M.shape), dtype=M.dtype, device=M.device, in_shapes=in_shapes)
        self.M = M
        self.is_symmetric = symmetric

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.T @ Y


class CountingOperator(LinearOperator):
    """Wraps an operator and counts columns and calls of ``_matmat``/``_rmatmat``."""

    def __init__(self, op: LinearOperator):
        super().__init__(
            op.shape,
            dtype=op.dtype,
            device=op.device,
            in_shapes=op.in_shapes,
            out_shapes=op.out_shapes,
        )
        self.op = op
        self.is_symmetric, self.is_psd = op.is_symmetric, op.is_psd
        self.columns = 0
        self.calls = 0

    def _matmat(self, X):
        self.columns += X.shape[1]
        self.calls += 1
        return self.op._matmat(X)

    def _rmatmat(self, Y):
        self.columns += Y.shape[1]
        self.calls += 1
        return self.op._rmatmat(Y)


# --------------------------------------------------------------------------- cases
def dense_case(g):
    M = randn(5, 4, g=g)
    return Dense(M), M.clone()


def dense_sym_case(g):
    M = random_sym(5, g)
    return Dense(M, symmetric=True), M.clone()


def dense_psd_case(g):
    M = random_spd(6, g)
    return Dense(M, psd=True), M.clone()


def diagonal_case(g):
    d = torch.rand(6, generator=g, dtype=F64) + 0.1
    return Diagonal(d), torch.diag(d.clone())


def identity_case(g):
    return Identity(5, 2.5, dtype=F64), 2.5 * torch.eye(5, dtype=F64)


def kronecker_case(g):
    A, B = random_spd(3, g), random_spd(4, g)
    return Kronecker(A, B, psd=True), torch.kron(A, B)


def kronecker3_case(g):
    A, B, C = random_spd(2, g), random_spd(3, g), random_spd(2, g)
    return Kronecker(A, B, C, psd=True), torch.kron(torch.kron(A, B), C)


def kronecker_rect_case(g):
    A, B = randn(2, 3, g=g), randn(4, 2, g=g)
    return Kronecker(A, B), torch.kron(A, B)


def block_diagonal_case(g):
    A, B = random_spd(3, g), random_spd(2, g)
    d = torch.rand(2, generator=g, dtype=F64) + 0.5
    op = BlockDiagonal([Dense(A, psd=True), B, Diagonal(d)])
    op_ref = torch.block_diag(A, B, torch.diag(d))
    return op, op_ref


def lowrank_sym_case(g):
    U, s = randn(6, 2, g=g), torch.rand(2, generator=g, dtype=F64) + 0.5
    return LowRank(U, s), U @ torch.diag(s) @ U.T


def lowrank_rect_case(g):
    U, s, V = randn(5, 2, g=g), randn(2, g=g), randn(4, 2, g=g)
    return LowRank(U, s, V), U @ torch.diag(s) @ V.T


def symmetric_eigen_case(g):
    Q = random_orthonormal(6, 3, g)
    lam = torch.rand(3, generator=g, dtype=F64) + 0.5
    return SymmetricEigen(Q, lam, complement=0.3), Q @ torch.diag(lam) @ Q.T + 0.3 * (
        torch.eye(6, dtype=F64) - Q @ Q.T
    )


def generic_case(g):
    M = randn(4, 6, g=g)
    return MatmatOnly(M), M.clone()


def sum_case(g):
    A, B = random_spd(4, g), random_sym(4, g)
    return Dense(A, psd=True) + Dense(B, symmetric=True), A + B


def product_case(g):
    A, B = randn(3, 4, g=g), randn(4, 5, g=g)
    return Dense(A) @ Dense(B), A @ B


def scaled_case(g):
    A = random_spd(4, g)
    return -1.5 * Dense(A, psd=True), -1.5 * A


def adjoint_case(g):
    A = randn(3, 5, g=g)
    return Dense(A).T, A.T.clone()


def difference_case(g):
    K = torch.kron(random_spd(2, g), random_spd(2, g))
    d = torch.rand(4, generator=g, dtype=F64)
    F1, F2 = random_spd(2, g), random_spd(2, g)
    A, B = Kronecker(F1, F2, psd=True), Diagonal(d)
    return A - B / 2.0 + Dense(K, psd=True), torch.kron(F1, F2) - torch.diag(d) / 2 + K


CASES = {
    "dense": dense_case,
    "dense_sym": dense_sym_case,
    "dense_psd": dense_psd_case,
    "diagonal": diagonal_case,
    "identity": identity_case,
    "kronecker": kronecker_case,
    "kronecker3": kronecker3_case,
    "kronecker_rect": kronecker_rect_case,
    "block_diagonal": block_diagonal_case,
    "lowrank_sym": lowrank_sym_case,
    "lowrank_rect": lowrank_rect_case,
    "symmetric_eigen": symmetric_eigen_case,
    "generic": generic_case,
    "sum": sum_case,
    "product": product_case,
    "scaled": scaled_case,
    "adjoint": adjoint_case,
    "difference": difference_case,
}


# --------------------------------------------------------------------------- conformance
def check_operator(op: LinearOperator, ref: torch.Tensor, g) -> None:
    """The generic contract: products in every input form, adjoint, dense and SciPy views."""
    m, n = ref.shape
    assert op.shape == (m, n)
    assert op.dtype == ref.dtype and op.device == ref.device
    x, X = randn(n, g=g), randn(n, 3, g=g)
    y, Y = randn(m, g=g), randn(m, 3, g=g)
    torch.testing.assert_close(op @ x, ref @ x)
    torch.testing.assert_close(op @ X, ref @ X)
    assert (op @ x).shape == (m,)
    torch.testing.assert_close(op.T @ y, ref.T @ y)
    torch.testing.assert_close(op.T @ Y, ref.T @ Y)
    torch.testing.assert_close(op.rmatmat(Y), ref.T @ Y)
    torch.testing.assert_close(y @ op, y @ ref)
    torch.testing.assert_close(Y.T @ op, Y.T @ ref)
    torch.testing.assert_close(op.to_dense(), ref)
    assert op.T.shape == (n, m)
    torch.testing.assert_close(op.T.T @ x, ref @ x)
    # Declared properties are promises: check them against the reference.
    if op.is_symmetric:
        torch.testing.assert_close(ref, ref.T)
    if op.is_psd:
        assert torch.linalg.eigvalsh(ref).min() > -1e-10
    # SciPy view: same products, same dtype.
    S = op.to_scipy()
    assert S.shape == (m, n) and S.dtype == np.float64
    np.testing.assert_allclose(S.matvec(x.numpy()), (ref @ x).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatvec(y.numpy()), (ref.T @ y).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matmat(X.numpy()), (ref @ X).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S @ X.numpy(), (ref @ X).numpy(), rtol=1e-10, atol=1e-12)
