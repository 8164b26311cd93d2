import pytest
import torch
from optim_references import DenseSOAP, adam_step, run_ours

from curvkit.optim import SOAP


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.5 * torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_soap_matches_dense_reference(method):
    shape, Gs = (5, 4), grads((5, 4), 14)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=3)
    ours, _ = run_ours(SOAP, W0, Gs, basis_update=method, **kw)
    ref = DenseSOAP(shape, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=3, method=method)
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        torch.testing.assert_close(got, W, rtol=1e-9, atol=1e-11)


def test_soap_frequency_one_eigh_is_adam_in_exact_eigenbasis():
    # With an exact eigh refresh every step, the rotated moments live in the exact eigenbasis of
    # the current factors: re-derive that with Adam's moments kept in an explicit basis.
    shape, Gs = (4, 3), grads((4, 3), 10, seed=3)
    W0 = torch.zeros(shape)
    ours, _ = run_ours(SOAP, W0, Gs, lr=0.1, betas=(0.9, 0.9), eps=1e-10, weight_decay=0.0,
                       precondition_frequency=1, basis_update="eigh")
    ref = DenseSOAP(shape, lr=0.1, betas=(0.9, 0.9), eps=1e-10, wd=0.0, freq=1, method="eigh")
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        # the basis used at each step diagonalises the factors accumulated before it
        L = ref.L
        D = ref.QL.T @ L @ ref.QL
        torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), atol=1e-10, rtol=0)
        torch.testing.assert_close(got, W, rtol=1e-9, atol=1e-11)


def test_soap_without_preconditioned_axes_is_adamw():
    # max_preconditioner_dim=1 with large_dims="identity" leaves Q = I: SOAP reduces to AdamW
    # (from the second step on, because the first step only initialises).
    shape, Gs = (4, 3), grads((4, 3), 6)
    W0 = torch.ones(shape)
    ours, _ = run_ours(SOAP, W0, Gs, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                       max_preconditioner_dim=1, start_preconditioning_step=0)
    W, state = W0.clone(), {}
    for G, got in zip(Gs, ours):
        W, _ = adam_step(W, G, state, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.1)
        torch.testing.assert_close(got, W)


def test_soap_one_dim_parameter_gets_adam():
    Gs = grads((7,), 4)
    ours, _ = run_ours(SOAP, torch.ones(7), Gs, lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    W, state = torch.ones(7), {}
    for G, got in zip(Gs, ours):
        W, _ = adam_step(W, G, state, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.0)
        torch.testing.assert_close(got, W)


def test_soap_one_sided_limit():
    # The large axis is left unrotated: the right factor is never built and Q_R = I, so the run
    # equals the dense reference with Q_R fixed to the identity.
    shape, Gs = (3, 6), grads((3, 6), 8)
    W0 = torch.zeros(shape)
    ours, opt = run_ours(SOAP, W0, Gs, lr=0.05, betas=(0.9, 0.95), weight_decay=0.0,
                         precondition_frequency=2, max_preconditioner_dim=4)
    assert set(opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]) == {
        "Q0", "P0", "exp_avg", "exp_avg_sq"}
    ref = DenseSOAP(shape, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.0, freq=2, right=False)
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = ref.step(W, G)
        torch.testing.assert_close(got, W, rtol=1e-9, atol=1e-11)


def test_soap_validation_messages():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=r"SOAP: betas\[1\] must be in \[0.0, 1.0\); got 1.5"):
        SOAP(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="SOAP: basis_update must be one of"):
        SOAP(p, basis_update="svd")
    with pytest.raises(ValueError, match="precondition_frequency must be >= 1; got 0"):
        SOAP(p, precondition_frequency=0)
    with pytest.raises(TypeError, match="state_dtype"):
        SOAP(p, state_dtype="bf16")
