import pytest
import torch
from optim_references import DenseShampoo, adam_step

from curvkit.optim import Shampoo
from curvkit.optim.shampoo import graft, shampoo_direction


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.5 * torch.randn(shape, generator=g) for _ in range(steps)]


def run_ours(W0, Gs, **kw):
    W = torch.nn.Parameter(W0.clone())
    opt = Shampoo([W], **kw)
    out = []
    for G in Gs:
        W.grad = G.clone()
        opt.step()
        out.append(W.detach().clone())
    return out, opt


KW = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-6, graft_eps=1e-8)


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2)])
def test_shampoo_matches_dense_eigh_reference(shape):
    Gs = grads(shape, 9)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours, _ = run_ours(W0, Gs, weight_decay=0.01, precondition_frequency=3, **KW)
    ref = DenseShampoo(shape, wd=0.01, freq=3, **KW)
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        torch.testing.assert_close(got, W, rtol=1e-8, atol=1e-10)


def test_shampoo_exponent_override_without_grafting():
    shape, Gs = (4, 3), grads((4, 3), 5, seed=5)
    ours, _ = run_ours(torch.zeros(shape), Gs, grafting="none", exponent_override=0.5,
                       precondition_frequency=1, **KW)
    ref = DenseShampoo(shape, wd=0.0, freq=1, exponent=0.5, grafting=False, **KW)
    W = torch.zeros(shape)
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        torch.testing.assert_close(got, W, rtol=1e-8, atol=1e-10)


def test_shampoo_update_has_adam_norm_and_starts_as_adam():
    shape, Gs = (6, 5), grads((6, 5), 6)
    W0 = torch.zeros(shape)
    ours, _ = run_ours(W0, Gs, start_preconditioning_step=3, **KW)
    state = {}
    prev = W0
    for i, (G, got) in enumerate(zip(Gs, ours)):
        W_adam, U_adam = adam_step(prev, G, state, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.0)
        if i < 3:
            torch.testing.assert_close(got, W_adam)
        else:  # grafted: the step has Adam's norm but not Adam's direction
            step = (prev - got) / 0.05
            torch.testing.assert_close(step.norm(), U_adam.norm())
            assert (step - U_adam).norm() > 1e-3 * U_adam.norm()
        prev = got


def test_shampoo_blocking():
    shape, Gs = (6, 4), grads((6, 4), 5)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    kw = dict(weight_decay=0.0, precondition_frequency=2, **KW)
    full, _ = run_ours(W0, Gs, **kw)
    same, _ = run_ours(W0, Gs, max_preconditioner_dim=6, **kw)
    for a, b in zip(full, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # max dim 3: rows split into two 3x4 blocks, each an independent Shampoo with its own graft
    blocked, opt = run_ours(W0, Gs, max_preconditioner_dim=4, **kw)
    assert len(opt.state[opt.param_groups[0]["params"][0]]["blocks"]) == 2
    refs = [DenseShampoo((4, 4), wd=0.0, freq=2, **KW), DenseShampoo((2, 4), wd=0.0, freq=2, **KW)]
    W = W0.clone()
    for G, got in zip(Gs, blocked):
        W = torch.cat([refs[0].step(W[:4], G[:4]), refs[1].step(W[4:], G[4:])])
        torch.testing.assert_close(got, W, rtol=1e-8, atol=1e-10)


def test_shampoo_direction_kernel_is_kronecker_root():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g)
    B = torch.randn(3, 3, generator=g)
    L, R = A @ A.T, B @ B.T
    M = torch.randn(4, 3, generator=g)
    wl, Ql = torch.linalg.eigh(L)
    wr, Qr = torch.linalg.eigh(R)
    got = Ql @ shampoo_direction(Ql.T @ M @ Qr, {0: wl, 1: wr}, exponent=0.25, eps=0.0) @ Qr.T
    # column-major vec: vec(L^-1/4 M R^-1/4) = (R^-1/4 ⊗ L^-1/4) vec(M)
    def root(S):  # via scipy's matrix power, independent of the eigh route above
        import scipy.linalg
        return torch.as_tensor(scipy.linalg.fractional_matrix_power(S.numpy(), -0.25).real)

    expected = torch.kron(root(R), root(L)) @ M.T.reshape(-1)
    torch.testing.assert_close(got.T.reshape(-1), expected)


def test_graft_norm():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(graft(a, b).norm(), b.norm())
    assert torch.equal(graft(torch.zeros(2), b[0]), torch.zeros(2))


@pytest.mark.parametrize("method", ["qr", "subspace"])
def test_shampoo_cheap_basis_updates_track_exact_roots(method):
    # With frequent refreshes on a fixed gradient distribution, QR power steps and subspace
    # refreshes converge to the eigenbasis, so the late updates approach the eigh updates.
    shape = (6, 5)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(6, 6, generator=g)
    Gs = [A @ torch.randn(shape, generator=g) for _ in range(60)]
    kw = dict(weight_decay=0.0, precondition_frequency=1, lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    exact, _ = run_ours(torch.zeros(shape), Gs, **kw)
    cheap, opt = run_ours(torch.zeros(shape), Gs, basis_update=method, subspace_rank=3, **kw)
    last = [(exact[i] - exact[i - 1], cheap[i] - cheap[i - 1]) for i in (58, 59)]
    for a, b in last:
        assert (a - b).norm() < 0.05 * a.norm()
    block = opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]
    Q = block["Q0"]
    torch.testing.assert_close(Q.T @ Q, torch.eye(6))
