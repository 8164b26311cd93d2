"""Regression tests of the sixth optimizer audit (Muon, SOAP, SpectralShampoo, basis helpers)."""

import pytest
import torch
from torch import nn

from curvkit.optim import SOAP, Muon, muon_param_groups
from curvkit.optim.muon import newton_schulz
from curvkit.optim.spectral import SpectralShampoo


def _spd(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A @ A.T + torch.eye(n, dtype=torch.float64)


# --------------------------------------------------------------------------- SpectralShampoo
def test_spectral_kl_step_after_a_first_step_with_caller_targets():
    # A "kl" group whose factors were started from caller targets (no scale c yet) must go on
    # with plain KL steps, keeping the learned S = S_a ⊗ S_b (its scale moves into c).
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    # update_frequency=3: the second step is no factor update, so S must be exactly kept
    opt = SpectralShampoo([p], lr=0.01, update_frequency=3)
    A, B = _spd(4, 1), _spd(3, 2)
    p.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    opt.step(targets={p: (A, B)})
    block = opt.state[p]["blocks"][0]
    S_before = torch.kron(block["B0"] @ torch.diag(block["d0"]) @ block["B0"].T,
                          block["B1"] @ torch.diag(block["d1"]) @ block["B1"].T)
    before = p.detach().clone()
    p.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    opt.step()  # was: KeyError 'log_c'
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
    # the scale went into c (stored at once, also between two factor updates)
    c = block["log_c"].exp()
    S_after = c * torch.kron(block["B0"] @ torch.diag(block["d0"]) @ block["B0"].T,
                             block["B1"] @ torch.diag(block["d1"]) @ block["B1"].T)
    assert (S_after - S_before).abs().max() <= 1e-12 * S_before.abs().max()
    for k in (0, 1):
        assert abs(float(block[f"d{k}"].log().sum())) < 1e-12
    p.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    opt.step()  # a KL factor update
    assert torch.isfinite(p).all() and torch.isfinite(block["log_c"])


# --------------------------------------------------------------------------- SOAP
def test_soap_bias_correction_off_also_for_parameters_that_get_adam():
    # bias_correction is a group option: 1-d parameters (Adam) must follow it like the matrices.
    b1, b2, eps = 0.9, 0.99, 1e-8
    G = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SOAP([p], lr=1.0, betas=(b1, b2), eps=eps, weight_decay=0.0, bias_correction=False)
    p.grad = G.clone()
    opt.step()
    expected = -((1 - b1) * G) / (((1 - b2) * G.square()).sqrt() + eps)
    # (plain comparisons: torch.testing's first call alone costs seconds)
    assert (p.detach() - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_soap_bias_correction_must_be_a_bool():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"bias_correction must be a bool; got 'false'"):
        SOAP([p], bias_correction="false")


# --------------------------------------------------------------------------- Muon
@pytest.mark.parametrize("kwargs, message", [
    (dict(ns_dtype="bf16"), r"ns_dtype must be None or a floating torch.dtype; got 'bf16'"),
    (dict(ns_dtype=torch.int32), r"ns_dtype must be None or a floating torch.dtype; got torch.int32"),
    (dict(adamw_betas=(0.9,)), r"adamw_betas must be a pair \(beta1, beta2\); got \(0.9,\)"),
    (dict(adamw_betas=(0.9, 1.5)), r"adamw_betas\[1\] must be in \[0.0, 1.0\); got 1.5"),
    (dict(ns_coefficients=3.0), r"ns_coefficients must be three real numbers \(a, b, c\); got 3.0"),
    (dict(ns_coefficients=("a", "b", "c")), r"ns_coefficients must be three real numbers"),
    (dict(nesterov="false"), r"nesterov must be a bool; got 'false'"),
])
def test_muon_validation_names_the_option(kwargs, message):
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises((TypeError, ValueError), match=message):
        Muon([p], **kwargs)


def test_muon_group_use_muon_must_be_a_choice():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"use_muon must be one of \(None, True, False\); got 'yes'"):
        Muon([{"params": [p], "use_muon": "yes"}])


def test_newton_schulz_of_zero_is_zero_even_without_eps():
    out = newton_schulz(torch.zeros(3, 5), eps=0.0)
    assert torch.equal(out, torch.zeros(3, 5))


def test_muon_with_eps_zero_keeps_a_zero_gradient_step_finite():
    # zero_grad(set_to_none=False) and a layer unused in that step: G = 0 and zero momentum
    p = nn.Parameter(torch.ones(3, 4))
    opt = Muon([p], lr=0.1, eps=0.0)
    p.grad = torch.zeros(3, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 4))


def test_muon_param_groups_refuses_a_head_module_outside_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"head .* is not a module of the model"):
        muon_param_groups(model, head=nn.Linear(8, 2))
