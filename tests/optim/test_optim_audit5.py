"""Audit regressions: zero-size parameters, sparse and complex input, add_param_group checks,
state dicts loaded into other parameters, Shampoo's eps = 0 on rank-deficient factors."""

import copy

import pytest
import torch
from torch import nn

from curvkit.optim import KLSOAP, SOAP, KLShampoo, Muon, Shampoo, SpectralShampoo, Symo

MAKERS = {
    "shampoo": lambda p: Shampoo(p, lr=1e-2, precondition_frequency=2),
    "soap": lambda p: SOAP(p, lr=1e-2, precondition_frequency=2),
    "klshampoo": lambda p: KLShampoo(p, lr=1e-2, precondition_frequency=2),
    "klsoap": lambda p: KLSOAP(p, lr=1e-2, precondition_frequency=2),
    "muon": lambda p: Muon(p, lr=1e-2),
    "spectral": lambda p: SpectralShampoo(p, lr=1e-2),
    "symo": lambda p: Symo(p, lr=1e-2),
}


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("name", list(MAKERS))
def test_zero_size_parameters_are_passed_over(name):
    # a zero-size parameter used to crash the finiteness check (inf-norm of an empty tensor)
    # and Symo's working shape (numel // shape[0] with shape[0] = 0)
    empty, w = nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.ones(4, 3))
    alone = nn.Parameter(torch.ones(4, 3))
    opt, ref = MAKERS[name]([empty, w]), MAKERS[name]([alone])
    for G in grads((4, 3), 4):
        empty.grad, w.grad, alone.grad = torch.zeros(0, 3), G.clone(), G.clone()
        opt.step()
        ref.step()
    assert empty.shape == (0, 3)
    assert torch.equal(w, alone) and not torch.equal(w, torch.ones(4, 3))


@pytest.mark.parametrize("name", list(MAKERS))
def test_sparse_gradient_is_refused_before_any_parameter_moves(name):
    dense, sparse = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(4, 2))
    opt = MAKERS[name]([dense, sparse])
    dense.grad, sparse.grad = torch.ones(3, 2), torch.ones(4, 2).to_sparse()
    with pytest.raises(TypeError, match=r"\.step: sparse gradients are not supported"):
        opt.step()
    assert torch.equal(dense, torch.ones(3, 2)) and not opt.state  # nothing half-written


@pytest.mark.parametrize("name", list(MAKERS))
def test_complex_parameters_are_refused_also_in_added_groups(name):
    z = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="parameters must be real floating tensors"):
        MAKERS[name]([z])
    opt = MAKERS[name]([nn.Parameter(torch.ones(3, 2))])
    with pytest.raises(TypeError, match="parameters must be real floating tensors"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_add_param_group_checks_muon_and_symo_groups():
    opt = Muon([nn.Parameter(torch.ones(3, 3))])
    with pytest.raises(ValueError, match="use_muon=True needs parameters with >= 2 dimensions"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "use_muon": True})
    assert len(opt.param_groups) == 1
    opt = Symo([nn.Parameter(torch.ones(3, 3))])
    with pytest.raises(ValueError, match=r"Symo: groups for working shape \(3,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))],
                             "groups": ("orthogonal", "identity")})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", list(MAKERS))
def test_load_state_dict_refuses_parameters_of_another_order_or_shape(name):
    a, b = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(2, 5))
    opt = MAKERS[name]([a, b])
    for Ga, Gb in zip(grads((4, 3), 3), grads((2, 5), 3, seed=1)):
        a.grad, b.grad = Ga, Gb
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    swapped = MAKERS[name]([nn.Parameter(torch.ones(2, 5)), nn.Parameter(torch.ones(4, 3))])
    with pytest.raises(ValueError, match=r"load_state_dict: the saved state of parameter 0.*"
                                         r"another order"):
        swapped.load_state_dict(saved)
    assert not swapped.state  # nothing loaded
    transposed = MAKERS[name]([nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(2, 5))])
    with pytest.raises(ValueError, match=r"has moment shapes \[\(4, 3\)\]"):
        transposed.load_state_dict(saved)
    same = MAKERS[name]([nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(2, 5))])
    same.load_state_dict(saved)  # the right shapes still load


def test_load_state_dict_checks_blocked_layouts():
    p = nn.Parameter(torch.ones(7, 5))
    opt = Shampoo([p], max_preconditioner_dim=3)
    p.grad = torch.ones(7, 5)
    opt.step()
    other = Shampoo([nn.Parameter(torch.ones(5, 7))], max_preconditioner_dim=3)
    with pytest.raises(ValueError, match="another order or with other shapes"):
        other.load_state_dict(opt.state_dict())


def test_shampoo_eps_zero_drops_null_directions_like_a_pseudo_inverse():
    # eps = 0 on a rank-1 gradient: the factors' zero eigenvalues gave 0^(-1/4) = inf and a
    # nan update; the pseudo-inverse root keeps the update finite and exact
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 3, generator=g, dtype=torch.float64)
    G = u @ v
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = Shampoo([p], lr=1.0, betas=(0.9, 0.99), eps=0.0, grafting="none",
                  precondition_frequency=1)
    p.grad = G.clone()
    opt.step()

    def pinv_root(S):
        w, V = torch.linalg.eigh(S)
        keep = w > 1e-12 * w.max()
        return V[:, keep] @ torch.diag(w[keep] ** -0.25) @ V[:, keep].T

    # bias-corrected factors after one step are G Gᵀ and Gᵀ G; the momentum is (1 - β₁) G
    expected = -pinv_root(G @ G.T) @ (0.1 * G) @ pinv_root(G.T @ G)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1)])
def test_spectral_targets_for_a_parameter_with_a_unit_axis_are_refused(shape):
    # the unit axis is dropped and the parameter gets Adam: the targets were silently ignored
    p = nn.Parameter(torch.ones(shape))
    opt = SpectralShampoo([p])
    p.grad = torch.ones(shape)
    with pytest.raises(ValueError, match="without size-1 axes"):
        opt.step(targets={p: (torch.eye(shape[0]), torch.eye(shape[1]))})
    assert torch.equal(p, torch.ones(shape)) and not opt.state


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP])
def test_kl_eigenvalues_follow_the_first_eigh_basis_after_a_late_start(cls):
    # With start_preconditioning_step > 0 the eigenvalue EMAs run in the identity basis until the
    # first eigh refresh; they stayed attached to column i of the new (descending) basis, so the
    # largest-variance direction got the smallest λ (and was amplified, not damped).
    a = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    Gs = [a.sqrt()[:, None] * torch.randn(3, 4, generator=g, dtype=torch.float64)
          for _ in range(7)]
    opts = []
    for start in (6, 7):  # 7: the same run without the refresh, i.e. λ in the old basis
        p = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
        opt = cls([p], lr=0.0, betas=(0.9, 0.5), start_preconditioning_step=start,
                  precondition_frequency=100, clamp=False)
        for G in Gs:
            p.grad = G.clone()
            opt.step()
        opts.append((opt, p))
    (refreshed, p), (plain, q) = opts
    new, old = refreshed.state[p]["blocks"][0], plain.state[q]["blocks"][0]
    for k in (0, 1):
        expected = new[f"Q{k}"].square().T @ old[f"lam{k}"]  # diag(Qᵀ diag(λ) Q), Q_old = I
        torch.testing.assert_close(new[f"lam{k}"], expected, rtol=1e-12, atol=0)
    assert (new["lam0"].diff() < 0).all()  # descending, like the new basis's eigenvalues


@pytest.mark.parametrize("target", ["kl", "shampoo"])
def test_spectral_all_zero_first_gradient_waits_for_a_nonzero_one(target):
    # an all-zero first statistic was initialised with d ~ tiny (and log c ~ log tiny): nan in
    # float64, steps of ~40 at lr 1e-2 in float32
    Gs = [G.double() for G in grads((5, 4), 5)]
    W0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p, q = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    late = SpectralShampoo([p], lr=1e-2, target=target)
    fresh = SpectralShampoo([q], lr=1e-2, target=target)
    p.grad = torch.zeros(5, 4, dtype=torch.float64)
    late.step()
    assert torch.equal(p.detach(), W0)
    for G in Gs:
        p.grad, q.grad = G.clone(), G.clone()
        late.step()
        fresh.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_symo_zero_first_gradient_with_a_refresh_interval_does_not_explode():
    # the root of an all-zero statistic was (ρ·tiny)^(-1/2) ~ 1e18 and was kept until the next
    # scheduled refresh: the next steps moved the parameters by ~1e18
    Gs = grads((5, 4), 4)
    W0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    p = nn.Parameter(W0.clone())
    opt = Symo([p], lr=1e-2, precondition_frequency=3)
    p.grad = torch.zeros(5, 4)
    opt.step()
    assert torch.equal(p.detach(), W0)
    for G in Gs:  # the first step with curvature computes its root at once
        p.grad = G.clone()
        before = p.detach().clone()
        opt.step()
        assert 0 < (p.detach() - before).abs().max() < 0.2  # lr 1e-2: steps of a few 1e-2
