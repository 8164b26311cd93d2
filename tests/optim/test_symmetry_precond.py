"""Symo (symmetry-averaged preconditioning) against hand-written dense float64 references."""

from __future__ import annotations

import pytest
import torch

from curvkit.optim import NonFiniteGradientError
from curvkit.optim.symmetry_precond import Symo, auto_groups


def _polar(G):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def _inv_sqrt_damped(S, rho):
    lam, V = torch.linalg.eigh(S)
    shift = rho * lam.max()
    return V @ torch.diag((lam.clamp_min(0) + shift).rsqrt()) @ V.T


def _perm_average(G):
    """Spec closed form of the S_h orbit average of vec(G) vec(G)ᵀ, G: (h, f)."""
    h = G.shape[0]
    s = G.sum(0)
    D = G.T @ G / h
    O = (torch.outer(s, s) - G.T @ G) / (h * (h - 1))
    return torch.kron(torch.eye(h), D) + torch.kron(torch.ones(h, h) - torch.eye(h), O)


def _orth_average(G):
    return torch.kron(torch.eye(G.shape[0]), G.T @ G / G.shape[0])


def test_single_step_orthogonal_group_is_muon():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 4, generator=g)
    W = torch.nn.Parameter(torch.zeros(6, 4))
    opt = Symo([W], lr=0.1, betas=(0.0, 0.0), damping=1e-14)
    W.grad = G.clone()
    opt.step()
    torch.testing.assert_close(W.detach(), -0.1 * 6**0.5 * _polar(G), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(("groups", "average"), [(("orthogonal", "identity"), _orth_average),
                                                 (("perm", "identity"), _perm_average)])
def test_matches_dense_reference(groups, average):
    g = torch.Generator().manual_seed(1)
    shape, lr, (b1, b2), rho, wd = (5, 3), 0.05, (0.9, 0.95), 1e-2, 0.01
    W0 = torch.randn(shape, generator=g)
    W = torch.nn.Parameter(W0.clone())
    opt = Symo([W], lr=lr, betas=(b1, b2), damping=rho, groups=groups, weight_decay=wd)
    M, S, ref = torch.zeros(shape), torch.zeros(15, 15), W0.clone()
    for t in range(1, 6):
        G = torch.randn(shape, generator=g)
        W.grad = G.clone()
        opt.step()
        M = b1 * M + (1 - b1) * G
        M_hat = M / (1 - b1**t)
        S = b2 * S + (1 - b2) * average(M_hat)
        step = _inv_sqrt_damped(S / (1 - b2**t), rho) @ M_hat.flatten()
        ref = ref * (1 - lr * wd) - lr * step.reshape(shape)
        torch.testing.assert_close(W.detach(), ref, rtol=1e-9, atol=1e-10)


def test_sign_group_on_vectors_is_adam_like():
    g = torch.Generator().manual_seed(2)
    b = torch.nn.Parameter(torch.zeros(4))
    opt = Symo([b], lr=1.0, betas=(0.9, 0.99), damping=1e-3)
    M, V, ref = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for t in range(1, 5):
        G = torch.randn(4, generator=g)
        b.grad = G.clone()
        opt.step()
        M = 0.9 * M + 0.1 * G
        M_hat = M / (1 - 0.9**t)
        V = 0.99 * V + 0.01 * M_hat.square()
        V_hat = V / (1 - 0.99**t)
        ref = ref - M_hat / (V_hat + 1e-3 * V_hat.max()).sqrt()
        torch.testing.assert_close(b.detach(), ref)


def test_auto_groups_and_higher_order_parameters():
    assert auto_groups((8, 3)) == ("orthogonal", "identity")
    assert auto_groups((3, 8)) == ("identity", "orthogonal")
    assert auto_groups((5,)) == ("sign",)
    conv = torch.nn.Parameter(torch.zeros(4, 2, 3, 3))
    opt = Symo([conv], lr=0.1, betas=(0.0, 0.0), damping=1e-14)
    G = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    conv.grad = G.clone()
    opt.step()
    expected = -0.1 * 18**0.5 * _polar(G.reshape(4, 18))  # (4, 18): orthogonal on the 18 axis
    torch.testing.assert_close(conv.detach().reshape(4, 18), expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_resume_is_bit_for_bit(state_dtype):
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))

    def per_shape(shape):
        return ("perm", "identity") if shape == (5, 3) else auto_groups(shape)

    def build(model):
        return Symo(model.parameters(), lr=1e-2, groups=per_shape, precondition_frequency=2,
                    state_dtype=state_dtype, weight_decay=0.01)

    def closure(m):
        loss = torch.nn.functional.mse_loss(m(X), Y)
        loss.backward()
        return loss

    model = make()
    opt = build(model)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: closure(model))
    if state_dtype is not None:
        assert opt.state[model[0].weight]["factors"].dtype == state_dtype
    twin = make()
    twin.load_state_dict(model.state_dict())
    twin_opt = build(twin)
    twin_opt.load_state_dict(opt.state_dict())
    for _ in range(3):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            o.step(lambda m=m: closure(m))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_validation_and_nonfinite():
    W = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"Symo: groups for working shape \(3, 2\) must be 2"):
        Symo([W], groups=("perm",))
    with pytest.raises(ValueError, match="Symo: groups must be 'auto'"):
        Symo([W], groups="muon")
    with pytest.raises(ValueError, match="Symo: damping must be in"):
        Symo([W], damping=0.0)
    opt = Symo([W])
    W.grad = torch.full((3, 2), float("nan"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert torch.equal(W.detach(), torch.zeros(3, 2))
