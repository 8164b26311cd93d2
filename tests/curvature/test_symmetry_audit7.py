"""``SymmetryAveraged.diagonal`` and ``SymmetryAveraged.eigh`` against dense float64 references.

The references average ``A M Aᵀ`` explicitly over every element of the finite group (built from
permutation and sign matrices here, independently of the library's label structure) and take
``torch.linalg.eigh`` of the result.
"""

from __future__ import annotations

import pytest
import torch
from symmetry_references import brute_force

from curvkit.curvature.symmetry import SymmetryAveraged, symmetry_block_diagonal

CASES = [
    ((4, 3), ("perm", "identity")),
    ((3, 4), ("identity", "perm")),
    ((4, 3), ("sign", "identity")),
    ((3, 4), ("identity", "sign")),
    ((3, 3), ("signed_perm", "identity")),
    ((3, 4), ("perm", "perm")),
    ((3, 3), ("perm", "sign")),
    ((3, 3), ("sign", "signed_perm")),
    ((2, 3), ("identity", "identity")),
    ((1, 3), ("perm", "identity")),  # a one-element hidden axis: a single label
    ((5,), ("perm",)),
    ((4,), ("sign",)),
]


def _indefinite(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return A + A.T


def _check_eigh(op, S):
    """Eigenvalues ascending like torch.linalg.eigh; Q orthogonal; S Q = Q diag(λ)."""
    lam, Q = op.eigh()
    n = S.shape[0]
    eye = torch.eye(n)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(S), atol=1e-12, rtol=1e-12)
    Qd = Q @ eye
    torch.testing.assert_close(Qd.T @ Qd, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(S @ Qd, Qd * lam, atol=1e-12, rtol=0)
    torch.testing.assert_close(Q.T @ eye, Qd.T, atol=1e-14, rtol=0)  # the adjoint product
    return lam, Q


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_diagonal_and_eigh_of_an_indefinite_projection(shape, groups):
    n = torch.Size(shape).numel()
    M = _indefinite(n, 0)
    # shift to the middle of the averaged spectrum: averaging commutes with M -> M + tI, and
    # the projection then certainly has eigenvalues of both signs
    ends = torch.linalg.eigvalsh(brute_force(M, shape, groups))[[0, -1]]
    M = M - ends.mean() * torch.eye(n)
    S = brute_force(M, shape, groups)
    op = SymmetryAveraged.from_matrix(M, shape=shape, groups=groups)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(S), atol=1e-12, rtol=1e-12)
    lam, _ = _check_eigh(op, S)
    assert lam[0] < 0 < lam[-1]


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_diagonal_and_eigh_of_a_rank_deficient_sample_average(shape, groups):
    # one sample: most eigenvalues are exactly repeated zeros (a degenerate spectrum)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, *shape, generator=g)
    flat = v.reshape(1, -1)
    S = brute_force(flat.T @ flat, shape, groups)
    op = SymmetryAveraged.from_samples(v, groups=groups)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(S), atol=1e-12, rtol=1e-12)
    _check_eigh(op, S)


def test_eigh_of_a_multiple_of_the_identity():
    # every eigenvalue equal: any orthogonal Q is right, so only its properties are checked
    op = SymmetryAveraged.from_matrix(2.5 * torch.eye(12), shape=(4, 3),
                                      groups=("perm", "identity"))
    lam, Q = _check_eigh(op, 2.5 * torch.eye(12))
    torch.testing.assert_close(lam, torch.full((12,), 2.5))
    torch.testing.assert_close(op.diagonal(), torch.full((12,), 2.5))


@pytest.mark.parametrize("groups", [("orthogonal", "identity"), ("identity", "orthogonal")])
def test_orthogonal_group_against_the_closed_form(groups):
    # the O(h) average of g gᵀ for G: (4, 3) is I ⊗ GᵀG/4 (or GGᵀ/3 ⊗ I), built by torch.kron
    G = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    if groups[0] == "orthogonal":
        S = torch.kron(torch.eye(4), G.T @ G / 4)
    else:
        S = torch.kron(G @ G.T / 3, torch.eye(3))
    op = SymmetryAveraged.from_samples(G[None], groups=groups)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(S), atol=1e-12, rtol=1e-12)
    _check_eigh(op, S)


def test_eigenbasis_acts_on_vectors_and_blocks():
    G = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(3))
    op = SymmetryAveraged.from_samples(G, groups=("perm", "identity"))
    lam, Q = op.eigh()
    y = torch.randn(12, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(op @ (Q @ y), Q @ (lam[:, None] * y))
    torch.testing.assert_close(Q @ y[:, 0], (Q @ y)[:, 0])
    # S = Q diag(λ) Qᵀ applied to a parameter-shaped vector, flattened row-major
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(Q @ (lam * (Q.T @ w.flatten())), (op @ [w])[0].flatten())


def test_block_diagonal_of_symmetry_blocks_has_diagonal_and_eigh():
    g = torch.Generator().manual_seed(6)
    samples = [torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, generator=g)]
    groups = [("perm", "identity"), ("perm",)]
    op = symmetry_block_diagonal(samples, groups=groups)
    dense = torch.block_diag(*[
        brute_force(s.reshape(2, -1).T @ s.reshape(2, -1), s.shape[1:], grp)
        for s, grp in zip(samples, groups)])
    torch.testing.assert_close(op.diagonal(), torch.diagonal(dense), atol=1e-12, rtol=1e-12)
    lam, Q = op.eigh()
    Qd = Q @ torch.eye(9)
    torch.testing.assert_close(Qd @ torch.diag(lam) @ Qd.T, dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_eigh_and_diagonal(dtype):
    G = torch.randn(30, 4, 3, generator=torch.Generator().manual_seed(7))
    ref = SymmetryAveraged.from_samples(G, groups=("perm", "identity"))
    op = SymmetryAveraged.from_samples(G.to(dtype), groups=("perm", "identity"))
    lam, Q = op.eigh()
    diag = op.diagonal()
    assert lam.dtype == diag.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(lam.double(), ref.eigh()[0], rtol=tol, atol=tol)
    torch.testing.assert_close(diag.double(), ref.diagonal(), rtol=tol, atol=tol)
    x = torch.randn(12, generator=torch.Generator().manual_seed(8))
    back = (Q @ (Q.T @ x.to(dtype))).double()
    assert torch.linalg.vector_norm(back - x) < tol * torch.linalg.vector_norm(x) * 2


def test_eigh_refuses_non_finite_factors():
    factors = torch.zeros(2, 3, 3)
    factors[1, 0, 0] = float("nan")
    op = SymmetryAveraged((4, 3), ("perm", "identity"), factors)
    with pytest.raises(ValueError, match=r"SymmetryAveraged.eigh: the factors contain nan or "
                                         r"inf"):
        op.eigh()
