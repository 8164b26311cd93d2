"""Regression tests from the sixth audit of ``curvkit.curvature.symmetry``."""

from __future__ import annotations

import pytest
import torch

from curvkit.curvature.symmetry import SymmetryAveraged, orbit_mean

CASES = [((4, 3), ("perm", "identity")), ((3, 4), ("identity", "sign")),
         ((4, 3), ("orthogonal", "identity")), ((3, 3), ("perm", "sign")),
         ((2, 3), ("identity", "identity")), ((5,), ("perm",))]


def _indefinite(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A + A.T


def test_logdet_counts_negative_factor_determinants_with_their_multiplicity():
    # S = -I (12 x 12) has det +1: every factor is -I_3 (det -1) but the multiplicities 1 and 3
    # add up to an even power; the per-factor logdet used to give nan here.
    op = SymmetryAveraged.from_matrix(-torch.eye(12, dtype=torch.float64), shape=(4, 3),
                                      groups=("perm", "identity"))
    assert torch.logdet(op.to_dense()) == 0.0
    torch.testing.assert_close(op.logdet(), torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_logdet_matches_dense_logdet_of_indefinite_projections(shape, groups):
    n = torch.Size(shape).numel()
    for seed in range(6):  # several signs of det S
        op = SymmetryAveraged.from_matrix(_indefinite(n, seed), shape=shape, groups=groups)
        expected = torch.logdet(op.to_dense())  # nan for a negative determinant
        torch.testing.assert_close(op.logdet(), expected, equal_nan=True)


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_inverse_of_an_indefinite_projection_is_exact(shape, groups):
    # from_matrix of an indefinite Hessian is symmetric but not PSD: it has an exact inverse
    n = torch.Size(shape).numel()
    op = SymmetryAveraged.from_matrix(_indefinite(n, 0), shape=shape, groups=groups)
    dense = op.to_dense()
    eye = torch.eye(n, dtype=torch.float64)
    for damping in (0.0, 0.1):
        torch.testing.assert_close(op.inverse(damping).to_dense(),
                                   torch.linalg.inv(dense + damping * eye))


def test_psd_inverse_still_refuses_a_singular_factor():
    G = torch.randn(1, 4, 3, dtype=torch.float64)
    G[..., 2] = 0.0  # an exactly zero row and column of the factor GᵀG/4
    op = SymmetryAveraged.from_samples(G, groups=("orthogonal", "identity"))
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        op.inverse()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_low_precision_operators_have_pow_inverse_and_logdet(dtype, shape, groups):
    G = torch.randn(40, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = SymmetryAveraged.from_samples(G, groups=groups)
    op = SymmetryAveraged.from_samples(G.to(dtype), groups=groups)
    x = torch.randn(ref.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for got, want in ((op.pow(-0.5, damping=0.5), ref.pow(-0.5, damping=0.5)),
                      (op.inverse(0.5), ref.inverse(0.5))):
        assert got.dtype == dtype
        y, y_ref = (got @ x.to(dtype)).double(), want @ x
        assert torch.linalg.vector_norm(y - y_ref) < 0.05 * torch.linalg.vector_norm(y_ref)
    logdet = op.logdet()
    assert logdet.dtype == dtype
    torch.testing.assert_close(logdet.double(), ref.logdet(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("shape", "groups"), CASES)
def test_from_samples_with_no_samples_is_the_zero_operator(shape, groups):
    op = SymmetryAveraged.from_samples(torch.zeros(0, *shape), groups=groups)
    one = SymmetryAveraged.from_samples(torch.randn(1, *shape), groups=groups)
    assert op.factors.shape == one.factors.shape
    assert not op.factors.any()


def test_zero_size_acted_axis_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"axis 0 of shape \(0, 3\) has size 0"):
        SymmetryAveraged.from_samples(torch.zeros(1, 0, 3), groups=("perm", "identity"))
    # a zero-size free axis is fine: the operator is 0 x 0
    op = SymmetryAveraged.from_samples(torch.zeros(1, 0, 3), groups=("identity", "identity"))
    assert op.shape == (0, 0)
    op = SymmetryAveraged.from_matrix(torch.zeros(0, 0), shape=(0, 3), groups=("identity",) * 2)
    assert op.shape == (0, 0)
    # orbit_mean of an empty tensor stays an empty tensor
    assert orbit_mean(torch.zeros(0, 3), groups=("perm", "sign")).shape == (0, 3)


def test_groups_given_as_one_string_get_a_clear_error():
    with pytest.raises(ValueError, match=r"one group name per axis.*\('sign',\).*got the str"):
        SymmetryAveraged.from_samples(torch.zeros(1, 4), groups="sign")
    with pytest.raises(ValueError, match="got the string 'perm'"):
        orbit_mean(torch.zeros(4), groups="perm")


def test_weight_errors_say_what_was_wrong():
    G = torch.randn(2, 4, 3)
    groups = ("perm", "identity")
    with pytest.raises(ValueError, match=r"non-negative and finite.*got min -1"):
        SymmetryAveraged.from_samples(G, groups=groups, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="non-negative and finite"):
        SymmetryAveraged.from_samples(G, groups=groups, weights=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-negative and finite"):
        SymmetryAveraged.from_samples(G, groups=groups, weights=torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"tensor of shape \(2,\); got list"):
        SymmetryAveraged.from_samples(G, groups=groups, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"tensor of shape \(2,\); got \(2, 1\)"):
        SymmetryAveraged.from_samples(G, groups=groups, weights=torch.ones(2, 1))


@pytest.mark.parametrize("groups", [("identity", "identity"), ("perm", "identity"),
                                    ("perm", "perm"), ("sign", "identity")])
def test_orbit_mean_returns_a_new_writable_tensor(groups):
    x = torch.randn(3, 4)
    before = x.clone()
    out = orbit_mean(x, groups=groups)
    out.add_(1.0)  # an expanded view (or x itself) used to refuse this or write into x
    torch.testing.assert_close(x, before)
    torch.testing.assert_close(out - 1.0, orbit_mean(before, groups=groups))
