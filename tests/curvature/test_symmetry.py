"""Symmetry-averaged curvature against brute-force orbit averages and Monte-Carlo averages."""

from __future__ import annotations

import pytest
import torch
from symmetry_references import ELEMENTS, brute_force, permutations

from curvkit.curvature.symmetry import SymmetryAveraged, orbit_mean, symmetry_block_diagonal


def haar_orthogonal(h, generator):
    Z = torch.randn(h, h, generator=generator)
    Q, R = torch.linalg.qr(Z)
    return (Q * torch.sign(torch.diagonal(R))).contiguous()


FINITE_CASES = [
    ((4, 3), ("perm", "identity")),
    ((4, 3), ("identity", "perm")),
    ((4, 3), ("sign", "identity")),
    ((3, 4), ("identity", "sign")),
    ((3, 3), ("signed_perm", "identity")),
    ((4, 3), ("perm", "perm")),
    ((3, 3), ("perm", "sign")),
    ((3, 4), ("sign", "sign")),
    ((4, 3), ("identity", "identity")),
    ((5,), ("perm",)),
    ((4,), ("sign",)),
    ((4,), ("identity",)),
]


def _dense(op):
    n = op.shape[1]
    return op @ torch.eye(n)


@pytest.mark.parametrize(("shape", "groups"), FINITE_CASES)
def test_from_samples_equals_brute_force_orbit_average(shape, groups):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, *shape, generator=g)
    flat = V.reshape(3, -1)
    reference = brute_force(flat.T @ flat, shape, groups)
    op = SymmetryAveraged.from_samples(V, groups=groups)
    torch.testing.assert_close(_dense(op), reference, atol=1e-12, rtol=1e-12)
    # the operator also acts on parameter-shaped inputs (list form) and matrices of vectors
    x = torch.randn(*shape, generator=g)
    torch.testing.assert_close(op @ [x], [(reference @ x.flatten()).reshape(shape)])


@pytest.mark.parametrize(("shape", "groups"), FINITE_CASES)
def test_from_matrix_projects_like_orbit_average_and_is_idempotent(shape, groups):
    g = torch.Generator().manual_seed(1)
    n = torch.Size(shape).numel()
    A = torch.randn(n, n, generator=g)
    M = A @ A.T
    reference = brute_force(M, shape, groups)
    op = SymmetryAveraged.from_matrix(M, shape=shape, groups=groups)
    torch.testing.assert_close(_dense(op), reference, atol=1e-11, rtol=1e-11)
    again = SymmetryAveraged.from_matrix(reference, shape=shape, groups=groups)
    torch.testing.assert_close(again.factors, op.factors, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize(("shape", "groups"), FINITE_CASES)
def test_structured_methods_match_dense_reference(shape, groups):
    g = torch.Generator().manual_seed(2)
    V = torch.randn(30, *shape, generator=g)  # enough samples for full-rank factors
    flat = V.reshape(30, -1)
    S = brute_force(flat.T @ flat, shape, groups)
    op = SymmetryAveraged.from_samples(V, groups=groups)
    lam, Q = torch.linalg.eigh(S)
    damping = 0.3
    eye = torch.eye(S.shape[0])
    torch.testing.assert_close(_dense(op.inverse(damping)), torch.linalg.inv(S + damping * eye))
    for p in (0.5, -0.5, -1.0, 2.0):
        dense_pow = Q @ torch.diag((lam + damping).pow(p)) @ Q.T
        torch.testing.assert_close(_dense(op.pow(p, damping=damping)), dense_pow)
    torch.testing.assert_close(op.trace(), torch.trace(S))
    torch.testing.assert_close(op.logdet(), torch.logdet(S))


@pytest.mark.parametrize("groups", [("orthogonal", "identity"), ("identity", "orthogonal"),
                                    ("orthogonal", "orthogonal"), ("orthogonal", "perm")])
def test_continuous_group_monte_carlo_converges(groups):
    """Monte-Carlo over Haar-random O(h) (times uniform permutations) converges like 1/√N."""
    shape, N = (3, 3), 6400
    g = torch.Generator().manual_seed(3)
    G = torch.randn(*shape, generator=g)
    target = _dense(SymmetryAveraged.from_samples(G[None], groups=groups))

    def draw(grp, h):  # N group elements, (N, h, h)
        if grp == "orthogonal":
            Q, R = torch.linalg.qr(torch.randn(N, h, h, generator=g))
            return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
        if grp == "perm":
            perms = torch.stack(list(permutations(h)))
            return perms[torch.randint(len(perms), (N,), generator=g)]
        return torch.eye(h).expand(N, h, h)

    A, B = (draw(grp, h) for grp, h in zip(groups, shape))
    W = (A @ G @ B.mT).reshape(N, -1)  # orbit samples of the gradient
    outer = W[:, :, None] * W[:, None, :]
    running = outer.cumsum(0) / torch.arange(1, N + 1)[:, None, None]
    err = torch.linalg.matrix_norm(running - target) / torch.linalg.matrix_norm(target)
    # 64x more samples: the error should drop by about 8 (allow 3); and be small in absolute
    assert err[N - 1] < err[N // 64 - 1] / 3
    assert err[N - 1] < 0.05


@pytest.mark.parametrize(("shape", "groups"), [((4, 3), ("orthogonal", "identity")),
                                              ((4, 3), ("perm", "identity")),
                                              ((4, 3), ("sign", "perm")),
                                              ((3, 4), ("identity", "orthogonal"))])
def test_operator_commutes_with_random_group_elements(shape, groups):
    g = torch.Generator().manual_seed(4)
    op = SymmetryAveraged.from_samples(torch.randn(2, *shape, generator=g), groups=groups)
    S = _dense(op)
    mats = []
    for grp, h in zip(groups, shape):
        if grp == "orthogonal":
            mats.append(haar_orthogonal(h, g))
        elif grp == "identity":
            mats.append(torch.eye(h))
        else:
            choices = ELEMENTS[grp](h)
            mats.append(choices[int(torch.randint(len(choices), (1,), generator=g))])
    A = torch.kron(mats[0], mats[1])
    torch.testing.assert_close(A @ S @ A.T, S, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- Shampoo / Muon
def _polar(G):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def test_orthogonal_rows_give_muon_polar_factor():
    g = torch.Generator().manual_seed(5)
    G = torch.randn(6, 4, generator=g)
    op = SymmetryAveraged.from_samples(G[None], groups=("orthogonal", "identity"))
    step = (op.pow(-0.5) @ G.flatten()).reshape(6, 4)
    torch.testing.assert_close(step, 6**0.5 * _polar(G), atol=1e-12, rtol=1e-12)
    # the signed-permutation group has the same commutant, hence the same step
    op2 = SymmetryAveraged.from_samples(G[None], groups=("signed_perm", "identity"))
    torch.testing.assert_close((op2.pow(-0.5) @ G.flatten()).reshape(6, 4), step)


def test_orthogonal_columns_give_left_polar_factor():
    g = torch.Generator().manual_seed(6)
    G = torch.randn(3, 5, generator=g)
    op = SymmetryAveraged.from_samples(G[None], groups=("identity", "orthogonal"))
    step = (op.pow(-0.5) @ G.flatten()).reshape(3, 5)
    torch.testing.assert_close(step, 5**0.5 * _polar(G), atol=1e-12, rtol=1e-12)


def test_accumulated_orthogonal_average_is_one_sided_shampoo():
    """Σ_t w_t orbit averages of G_t = I ⊗ Σ_t w_t G_tᵀG_t / h: one-sided Shampoo, exponent -1/2."""
    g = torch.Generator().manual_seed(7)
    Gs = torch.randn(5, 4, 3, generator=g)
    beta = 0.9
    weights = torch.tensor([(1 - beta) * beta ** (4 - t) for t in range(5)])
    op = SymmetryAveraged.from_samples(Gs, groups=("orthogonal", "identity"), weights=weights)
    R = sum(w * Gt.T @ Gt for w, Gt in zip(weights, Gs)) / 4  # dense right factor
    lam, Q = torch.linalg.eigh(R)
    M = Gs[-1]
    eps = 1e-3
    expected = M @ Q @ torch.diag((lam + eps).pow(-0.5)) @ Q.T
    got = (op.pow(-0.5, damping=eps) @ M.flatten()).reshape(4, 3)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_sign_flips_on_both_axes_give_the_diagonal():
    g = torch.Generator().manual_seed(8)
    G = torch.randn(2, 3, 4, generator=g)
    op = SymmetryAveraged.from_samples(G, groups=("sign", "sign"))
    torch.testing.assert_close(_dense(op), torch.diag(G.square().sum(0).flatten()))
    assert op.num_stored == 12


def test_perm_closed_form_of_the_spec():
    """``I ⊗ D + (J - I) ⊗ O`` with ``D = GᵀG/h`` and ``O = (ssᵀ - GᵀG)/(h(h-1))``."""
    g = torch.Generator().manual_seed(9)
    h, f = 5, 3
    G = torch.randn(h, f, generator=g)
    s = G.sum(0)
    D = G.T @ G / h
    O = (torch.outer(s, s) - G.T @ G) / (h * (h - 1))
    I, J = torch.eye(h), torch.ones(h, h)
    expected = torch.kron(I, D) + torch.kron(J - I, O)
    op = SymmetryAveraged.from_samples(G[None], groups=("perm", "identity"))
    torch.testing.assert_close(_dense(op), expected)
    assert op.num_stored == 2 * f * (f + 1) // 2


def test_orbit_mean_matches_brute_force():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 4, generator=g)
    for groups in [("perm", "identity"), ("perm", "perm"), ("sign", "identity"),
                   ("identity", "identity")]:
        mats = [ELEMENTS[grp](h) for grp, h in zip(groups, x.shape)]
        total = sum(A @ x @ B.T for A in mats[0] for B in mats[1])
        expected = total / (len(mats[0]) * len(mats[1]))
        torch.testing.assert_close(orbit_mean(x, groups=groups), expected)


def test_block_diagonal_over_parameters_inverts_exactly():
    g = torch.Generator().manual_seed(11)
    W, b = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, generator=g)
    op = symmetry_block_diagonal([W, b], groups=[("perm", "identity"), ("perm",)])
    Wf, bf = W.reshape(2, -1), b
    ref = torch.block_diag(brute_force(Wf.T @ Wf, (4, 3), ("perm", "identity")),
                           brute_force(bf.T @ bf, (4,), ("perm",)))
    x = [torch.randn(4, 3, generator=g), torch.randn(4, generator=g)]
    out = op.inverse(0.5) @ x
    flat = torch.linalg.solve(ref + 0.5 * torch.eye(16), torch.cat([t.flatten() for t in x]))
    torch.testing.assert_close(torch.cat([t.flatten() for t in out]), flat)


def test_validation_messages():
    G = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="unknown group 'rotation'"):
        SymmetryAveraged.from_samples(G, groups=("rotation", "identity"))
    with pytest.raises(ValueError, match="non-compact"):
        SymmetryAveraged.from_samples(G, groups=("rescale", "identity"))
    with pytest.raises(ValueError, match="one group per axis"):
        SymmetryAveraged.from_samples(G, groups=("perm",))
    with pytest.raises(ValueError, match=r"vectors or matrices"):
        SymmetryAveraged((2, 2, 2), ("perm", "perm", "perm"), torch.zeros(2, 2, 2, 1, 1))
    with pytest.raises(ValueError, match=r"must have shape \(2, 2, 2\)"):
        SymmetryAveraged((3, 2), ("perm", "identity"), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"M must have shape \(6, 6\)"):
        SymmetryAveraged.from_matrix(torch.zeros(5, 5), shape=(3, 2), groups=("perm", "perm"))
    op = SymmetryAveraged.from_samples(G, groups=("orthogonal", "identity"))
    with pytest.raises(ValueError, match="damping must be"):
        op.inverse(-1.0)


def test_sequential_symmetries_names_hidden_unit_groups():
    from torch import nn

    from curvkit.curvature.symmetry import sequential_symmetries

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Tanh(),
                          nn.Linear(5, 2), nn.Linear(2, 6, bias=False))
    assert sequential_symmetries(model) == {
        "0.weight": ("perm", "identity"), "0.bias": ("perm",),
        "2.weight": ("signed_perm", "perm"), "2.bias": ("signed_perm",),
        "4.weight": ("orthogonal", "signed_perm"), "4.bias": ("orthogonal",),
        "5.weight": ("identity", "orthogonal"),
    }
    # the named groups are true symmetries of the network function
    g = torch.Generator().manual_seed(12)
    X = torch.randn(7, 3, generator=g)
    P = next(permutations(4)).flip(0)
    S = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])) @ next(permutations(5)).flip(1)
    with torch.no_grad():
        before = model(X)
        model[0].weight.copy_(P @ model[0].weight)
        model[0].bias.copy_(P @ model[0].bias)
        model[2].weight.copy_(S @ model[2].weight @ P.T)
        model[2].bias.copy_(S @ model[2].bias)
        model[4].weight.copy_(model[4].weight @ S.T)
        torch.testing.assert_close(model(X), before)
    with pytest.raises(TypeError, match="module '1' is a Dropout"):
        sequential_symmetries(nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2)))
