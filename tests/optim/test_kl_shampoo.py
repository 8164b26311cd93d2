import pytest
import torch
from optim_references import DenseKL, run_ours

from curvkit.optim import KLSOAP, KLShampoo
from curvkit.optim.kl_shampoo import kl_direction, kl_factor_terms


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.5 * torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2)])
def test_kl_matches_dense_reference(cls, shape):
    Gs = grads(shape, 12)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, opt = run_ours(cls, W0, Gs, precondition_frequency=3, **kw)
    ref = DenseKL(shape, lr=0.02, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=3,
                  soap=cls is KLSOAP)
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        torch.testing.assert_close(got, W, rtol=1e-8, atol=1e-10)
    # the eigenvalue estimates and the factors themselves (S = Q P Qᵀ) match too
    block = opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]
    for k in range(len(shape)):
        torch.testing.assert_close(block[f"lam{k}"], ref.lam[k])
        S = block[f"Q{k}"] @ block[f"P{k}"] @ block[f"Q{k}"].T
        torch.testing.assert_close(S, ref.S[k])


def test_kl_clamp_bounds_eigenvalues():
    # rank-one gradients: most eigenvalue estimates decay towards 0 and hit the floor
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, generator=g), torch.randn(11, generator=g)
    Gs = [torch.outer(u, v) * (1 + 0.1 * i) for i in range(40)]
    _, opt = run_ours(KLShampoo, torch.zeros(12, 11), Gs, lr=1e-3, betas=(0.9, 0.5))
    block = opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]
    floor0, floor1 = 12.0**-2, 11.0**-2
    assert block["lam0"].min() == pytest.approx(floor0)
    assert block["lam1"].min() == pytest.approx(floor1)


def test_kl_direction_dense_parity():
    g = torch.Generator().manual_seed(1)
    Qa = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    Qb = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    la, lb = torch.rand(6, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1
    M = torch.randn(6, 5, generator=g)
    got = Qa @ kl_direction(Qa.T @ M @ Qb, {0: la, 1: lb}, eps=0.0) @ Qb.T
    Sa_root = Qa @ torch.diag(la**-0.5) @ Qa.T
    Sb_root = Qb @ torch.diag(lb**-0.5) @ Qb.T
    torch.testing.assert_close(got, Sa_root @ M @ Sb_root)
    eps_form = kl_direction(M, {0: la, 1: lb}, eps=0.3)
    torch.testing.assert_close(eps_form, M / (torch.outer(la, lb).sqrt() + 0.3))


def test_kl_eigenvalue_ema_reaches_matrix_normal_fixed_point():
    # G = diag(sqrt a) Z diag(sqrt b) in exact bases: λ_a ⊗ λ_b → a ⊗ b (the KL fixed point),
    # while the individual scales are only determined up to c and 1/c.
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([4.0, 2.0, 1.0, 0.5]), torch.tensor([3.0, 1.0, 0.2])
    la, lb = torch.full((4,), 0.1), torch.full((3,), 0.1)
    beta, history = 0.99, []
    for i in range(4000):
        G = a.sqrt()[:, None] * torch.randn(4, 3, generator=g) * b.sqrt()[None, :]
        terms = kl_factor_terms(G, {0: la, 1: lb})
        la = beta * la + (1 - beta) * torch.diagonal(terms[0])
        lb = beta * lb + (1 - beta) * torch.diagonal(terms[1])
        if i >= 2000:
            history.append(torch.outer(la, lb))
    estimate = torch.stack(history).mean(0)
    torch.testing.assert_close(estimate, torch.outer(a, b), rtol=0.1, atol=0)
