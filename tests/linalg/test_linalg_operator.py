"""LinearOperator base: products in every form, lazy algebra, conversions, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_cases import CASES, F64, MatmatOnly, check_operator, gen, randn, random_spd, random_sym

from curvkit.linalg import Dense, Diagonal, Identity, Kronecker, LinearOperator, SolveOperator


@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance(name):
    g = gen(1)
    op, ref = CASES[name](g)
    check_operator(op, ref, g)


# --------------------------------------------------------------------------- algebra
def test_lazy_algebra_matches_dense():
    g = gen(2)
    A, B, C = randn(4, 4, g=g), randn(4, 4, g=g), randn(4, 3, g=g)
    a, b, c = Dense(A), Dense(B), Dense(C)
    x = randn(4, g=g)
    torch.testing.assert_close((a + b) @ x, (A + B) @ x)
    torch.testing.assert_close((a - b) @ x, (A - B) @ x)
    torch.testing.assert_close((3 * a) @ x, 3 * A @ x)
    torch.testing.assert_close((a * 3) @ x, 3 * A @ x)
    torch.testing.assert_close((a * torch.tensor(3.0)) @ x, 3 * A @ x)
    torch.testing.assert_close((a / 4) @ x, A @ x / 4)
    torch.testing.assert_close((-a) @ x, -(A @ x))
    torch.testing.assert_close((a @ b) @ x, A @ (B @ x))
    torch.testing.assert_close((a @ c).T @ x, C.T @ A.T @ x)
    torch.testing.assert_close(((a + b) @ c).to_dense(), (A + B) @ C)


def test_algebra_flattens_and_tracks_properties():
    g = gen(3)
    S, P = Dense(random_sym(3, g), symmetric=True), Dense(random_spd(3, g), psd=True)
    total = S + P + P
    assert len(total.ops) == 3  # nested sums are flattened
    assert total.is_symmetric and not total.is_psd
    assert (P + P).is_psd
    assert (2 * P).is_psd and not (-2 * P).is_psd
    assert (2 * (3 * P)).c == 6.0  # nested scalings collapse
    prod = P @ P @ P
    assert len(prod.ops) == 3 and not prod.is_symmetric
    assert P.T is P  # symmetric operators are their own adjoint
    N = Dense(randn(3, 3, g=g))
    assert N.T.T is N


def test_algebra_exact_methods_combine():
    g = gen(4)
    A, d = random_spd(3, g), torch.rand(3, generator=g, dtype=F64) + 0.5
    op = 2 * Dense(A, psd=True) + Diagonal(d)
    torch.testing.assert_close(op.trace(), 2 * A.trace() + d.sum())
    torch.testing.assert_close(op.diagonal(), 2 * A.diagonal() + d)
    scaled = 3 * Dense(A, psd=True)
    torch.testing.assert_close(scaled.logdet(), torch.logdet(3 * A))
    evals, _ = scaled.eigh()
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(3 * A))
    inv = scaled.inverse(damping=0.5)
    torch.testing.assert_close(
        inv.to_dense(), torch.linalg.inv(3 * A + 0.5 * torch.eye(3, dtype=F64))
    )
    adj = Dense(randn(3, 3, g=g) + 3 * torch.eye(3, dtype=F64))
    torch.testing.assert_close(adj.T.trace(), adj.M.trace())
    torch.testing.assert_close(adj.T.diagonal(), adj.M.diagonal())


# --------------------------------------------------------------------------- hypothesis
def _random_operator(kind: int, n: int, g):
    if kind == 0:
        M = randn(n, n, g=g)
        return Dense(M), M
    if kind == 1:
        d = randn(n, g=g)
        return Diagonal(d), torch.diag(d)
    if kind == 2:
        U, s, V = randn(n, 2, g=g), randn(2, g=g), randn(n, 2, g=g)
        return MatmatOnly(U @ torch.diag(s) @ V.T), U @ torch.diag(s) @ V.T
    s = float(randn(1, g=g))
    return Identity(n, s, dtype=F64), s * torch.eye(n, dtype=F64)


op_kind = st.integers(0, 3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    ka=op_kind,
    kb=op_kind,
    c=st.floats(-3, 3, allow_nan=False),
)
def test_algebra_properties(seed, n, ka, kb, c):
    g = gen(seed)
    (A, Ad), (B, Bd) = _random_operator(ka, n, g), _random_operator(kb, n, g)
    x, X = randn(n, g=g), randn(n, 2, g=g)
    torch.testing.assert_close((A + B) @ x, A @ x + B @ x)
    torch.testing.assert_close((A - B) @ X, A @ X - B @ X)
    torch.testing.assert_close((A @ B).T @ x, B.T @ (A.T @ x))
    torch.testing.assert_close((A @ B).T.to_dense(), (Bd.T @ Ad.T))
    torch.testing.assert_close((c * A) @ X, c * (Ad @ X))
    torch.testing.assert_close((A + B).T @ x, (Ad + Bd).T @ x)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.integers(1, 4),
    q=st.integers(1, 4),
    damping=st.floats(0.0, 5.0, allow_nan=False),
)
def test_kronecker_inverse_property(seed, p, q, damping):
    g = gen(seed)
    A, B = random_spd(p, g), random_spd(q, g)
    inv = Kronecker(A, B, psd=True).inverse(damping)
    ref = torch.linalg.inv(torch.kron(A, B) + damping * torch.eye(p * q, dtype=F64))
    x = randn(p * q, g=g)
    torch.testing.assert_close(inv @ x, ref @ x)


# --------------------------------------------------------------------------- parameter lists
def test_parameter_list_products():
    g = gen(5)
    shapes = [(2, 3), (4,), (1, 2, 1)]
    n = 6 + 4 + 2
    M = randn(n, n, g=g)
    op = MatmatOnly(M, in_shapes=shapes)
    params = [randn(*s, g=g) for s in shapes]
    flat = torch.cat([p.flatten() for p in params])
    out = op @ params
    assert [tuple(o.shape) for o in out] == shapes
    torch.testing.assert_close(torch.cat([o.flatten() for o in out]), M @ flat)
    # With a trailing column dimension k.
    cols = [randn(*s, 3, g=g) for s in shapes]
    flat_cols = torch.cat([c.reshape(-1, 3) for c in cols])
    out = op @ cols
    assert [tuple(o.shape) for o in out] == [(*s, 3) for s in shapes]
    torch.testing.assert_close(torch.cat([o.reshape(-1, 3) for o in out]), M @ flat_cols)
    # The adjoint keeps the parameter shapes, and a flat vector still works.
    out_t = op.T @ params
    torch.testing.assert_close(torch.cat([o.flatten() for o in out_t]), M.T @ flat)
    torch.testing.assert_close(op @ flat, M @ flat)
    torch.testing.assert_close(torch.cat([o.flatten() for o in op.rmatmat(params)]), M.T @ flat)
    # Algebra keeps the shapes.
    both = op + Identity(n, 2.0, dtype=F64, in_shapes=shapes)
    out = both @ params
    torch.testing.assert_close(torch.cat([o.flatten() for o in out]), (M + 2 * torch.eye(n)) @ flat)


def test_parameter_list_errors():
    g = gen(6)
    op = MatmatOnly(randn(5, 5, g=g), in_shapes=[(2, 2), (1,)])
    with pytest.raises(ValueError, match=r"expected a list of 2 tensors; got 1"):
        op @ [randn(2, 2, g=g)]
    with pytest.raises(ValueError, match=r"expected tensors of shapes \[\(2, 2\), \(1,\)\]"):
        op @ [randn(2, 3, g=g), randn(1, g=g)]
    with pytest.raises(ValueError, match="common trailing k"):
        op @ [randn(2, 2, 3, g=g), randn(1, 2, g=g)]
    with pytest.raises(TypeError, match="no parameter shapes"):
        Dense(randn(3, 3, g=g)) @ [randn(3, g=g)]
    with pytest.raises(ValueError, match=r"in_shapes \[\(2, 2\)\] hold 4 entries; expected 5"):
        MatmatOnly(randn(5, 5, g=g), in_shapes=[(2, 2)])


# --------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_scipy_preserves_dtype(dtype):
    import scipy.sparse.linalg

    g = gen(7)
    A = random_spd(8, g)
    S = Dense(A.to(dtype), psd=True).to_scipy()
    assert S.dtype == np.dtype(str(dtype).removeprefix("torch."))
    x = np.random.default_rng(0).standard_normal(8).astype(S.dtype)
    assert S.matvec(x).dtype == S.dtype
    # SciPy's own solver runs on top of it.
    evals = scipy.sparse.linalg.eigsh(Dense(A, psd=True).to_scipy(), k=2, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(evals), torch.linalg.eigvalsh(A)[-2:].numpy(), rtol=1e-8)


def test_to_changes_dtype_and_keeps_structure():
    g = gen(8)
    A, B = random_spd(2, g), random_spd(3, g)
    op = Kronecker(A, B, psd=True) + 2 * Diagonal(torch.rand(6, generator=g, dtype=F64))
    op32 = op.to(torch.float32)
    assert op32.dtype == torch.float32 and op32.is_psd
    x = randn(6, g=g)
    torch.testing.assert_close(op32 @ x.float(), (op @ x).float(), rtol=1e-5, atol=1e-5)
    assert op.to(device="cpu").device == torch.device("cpu")
    with pytest.raises(NotImplementedError, match="cannot be moved"):
        MatmatOnly(randn(2, 2, g=g)).to(torch.float32)
    with pytest.raises(TypeError, match="expected a dtype or a device"):
        op.to(3)


def test_to_dense_of_generic_operator_uses_one_product():
    g = gen(9)
    M = randn(4, 5, g=g)
    torch.testing.assert_close(MatmatOnly(M).to_dense(), M)


# --------------------------------------------------------------------------- bad input
def test_operand_errors_name_expected_and_received():
    g = gen(10)
    op = Dense(randn(4, 3, g=g))
    with pytest.raises(
        ValueError, match=r"Dense: expected an operand of shape \(3,\) or \(3, k\); got \(4,\)"
    ):
        op @ randn(4, g=g)
    with pytest.raises(ValueError, match=r"got \(3, 2, 2\)"):
        op @ randn(3, 2, 2, g=g)
    with pytest.raises(TypeError, match="expected operand dtype torch.float64; got torch.float32"):
        op @ torch.ones(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected operand on device cpu; got meta"):
        op @ torch.ones(3, dtype=F64, device="meta")
    with pytest.raises(TypeError, match="got ndarray"):
        op @ np.ones(3)
    with pytest.raises(ValueError, match=r"expected an operand of shape \(4,\)"):
        op.T @ randn(3, g=g)


def test_algebra_errors():
    g = gen(11)
    a, b = Dense(randn(3, 3, g=g)), Dense(randn(4, 4, g=g))
    with pytest.raises(ValueError, match="Sum: operands must have equal shapes"):
        a + b
    with pytest.raises(ValueError, match=r"Product: inner dimensions differ: \(3, 3\) @ \(4, 4\)"):
        a @ b
    with pytest.raises(TypeError, match="operators must share one dtype"):
        a + Dense(torch.ones(3, 3, dtype=torch.float32))
    with pytest.raises(TypeError):
        a + torch.ones(3, 3, dtype=F64)
    with pytest.raises(TypeError):
        a * "x"
    with pytest.raises(ValueError, match="shape must be non-negative"):
        LinearOperator((-1, 2), dtype=F64, device="cpu")


def test_generic_methods_say_what_to_use_instead():
    g = gen(12)
    op = MatmatOnly(random_spd(3, g), symmetric=True)
    with pytest.raises(NotImplementedError, match=r"curvkit.linalg.trace\(A, method='xtrace'"):
        op.trace()
    with pytest.raises(NotImplementedError, match="curvkit.linalg.diagonal"):
        op.diagonal()
    with pytest.raises(NotImplementedError, match="spectral_density"):
        op.logdet()
    with pytest.raises(NotImplementedError, match=r"curvkit.linalg.eigsh\(A, k\)"):
        op.eigh()
    with pytest.raises(NotImplementedError, match="Dense"):
        op.sqrt()
    with pytest.raises(NotImplementedError, match="must implement _matmat"):
        LinearOperator((2, 2), dtype=F64, device="cpu") @ torch.ones(2, dtype=F64)
    with pytest.raises(NotImplementedError, match="defines no transpose product"):
        _NoTranspose(torch.ones(2, 3, dtype=F64)).T @ torch.ones(2, dtype=F64)


class _NoTranspose(LinearOperator):
    def __init__(self, M):
        super().__init__(tuple(M.shape), dtype=M.dtype, device=M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


def test_generic_inverse_is_an_iterative_solve():
    g = gen(13)
    A = random_spd(6, g)
    op = MatmatOnly(A, symmetric=True)
    op.is_psd = True
    inv = op.inverse(damping=0.1, rtol=1e-12)
    assert isinstance(inv, SolveOperator) and inv.is_symmetric and inv.is_psd
    B = randn(6, 2, g=g)
    torch.testing.assert_close(inv @ B, torch.linalg.solve(A + 0.1 * torch.eye(6, dtype=F64), B))
    torch.testing.assert_close(inv.inverse() @ B, (A + 0.1 * torch.eye(6, dtype=F64)) @ B)
    inv_m = op.inverse(method="minres", rtol=1e-12)
    torch.testing.assert_close(inv_m @ B, torch.linalg.solve(A, B))
    with pytest.raises(ValueError, match="unknown solver method 'lu'"):
        op.inverse(method="lu")
    with pytest.raises(ValueError, match="needs an operator declared symmetric"):
        MatmatOnly(A).inverse()
