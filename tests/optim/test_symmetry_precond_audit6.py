"""Regression tests from the sixth audit of ``curvkit.optim.symmetry_precond``."""

from __future__ import annotations

import pytest
import torch

from curvkit.curvature.symmetry import SymmetryAveraged
from curvkit.optim.symmetry_precond import Symo, auto_groups, symo_direction


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan")])
def test_symo_direction_refuses_non_positive_damping(damping):
    G = torch.randn(4, 3)
    S = SymmetryAveraged.from_samples(G[None], groups=("orthogonal", "identity"))
    with pytest.raises(ValueError, match=r"symo_direction: damping must be in \(0.0, inf\)"):
        symo_direction(G, S, damping=damping)


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
def test_auto_groups_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=rf"auto_groups: expected a working shape.*{shape}"):
        auto_groups(shape)


def test_callable_groups_returning_a_string_get_a_clear_error():
    b = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"sequence of names.*got the string 'sign'"):
        Symo([b], groups=lambda shape: "sign")


def test_factor_state_of_other_groups_is_refused_not_broadcast():
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    opt = Symo([W], groups=("orthogonal", "identity"))
    W.grad = torch.randn(4, 3, generator=g)
    opt.step()
    # e.g. a state dict saved with other groups, or a groups callable that changed since:
    # the (1, 3, 3) factors used to be broadcast silently into the (2, 3, 3) perm statistic
    opt.param_groups[0]["groups"] = ("perm", "identity")
    before = W.detach().clone()
    with pytest.raises(ValueError, match=r"factors of shape \(1, 3, 3\).*expected \(2, 3, 3\)"):
        opt.step()
    assert torch.equal(W.detach(), before)
