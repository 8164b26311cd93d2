"""Adam's second moment ``Ṽ`` across basis changes in SOAP and KL-SOAP.

At a late ``start_preconditioning_step`` ``Ṽ`` was accumulated in the identity basis and used to
be reused as if its entries belonged to the new eigenbasis; it is now carried into that basis
(the diagonal of the dense rotation), and ``second_moment="map"`` does the same at every refresh.
The references keep full factors, take bases from ``torch.linalg.eigh``/QR, and map ``Ṽ`` through
an explicit dense ``(mn, mn)`` rotation.
"""

from __future__ import annotations

import io

import pytest
import torch
from optim_references import DenseKL, DenseSOAP, assert_follows, map_second_moment, run_ours
from torch import nn

from curvkit.optim import KLSOAP, SOAP, KLShampoo
from curvkit.optim._basis import BasisChange


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic rows so that the eigenbasis is far from the identity
    scale = torch.linspace(0.3, 3.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    base = torch.randn(shape, generator=g)
    return [scale * (base + 0.7 * torch.randn(shape, generator=g)) for _ in range(steps)]


def orthogonal(d, g):
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g))
    return Q * torch.sign(torch.diagonal(R))


# --------------------------------------------------------------------------- the mapping itself
@pytest.mark.parametrize("shape", [(4, 3), (3, 4, 2)])
def test_second_moments_is_the_diagonal_of_the_dense_rotation(shape):
    g = torch.Generator().manual_seed(0)
    V = torch.rand(shape, generator=g) + 0.1
    Q_old = [orthogonal(d, g) for d in shape]
    Q_new = [orthogonal(d, g) for d in shape]
    got = V
    for k, (Qo, Qn) in enumerate(zip(Q_old, Q_new)):
        got = BasisChange(coord_map=Qn.T @ Qo).second_moments(got, k)
    torch.testing.assert_close(got, map_second_moment(V, Q_old, Q_new), rtol=1e-12, atol=0)
    # an EMA's total weight (and so the bias correction) is unchanged by an orthogonal change
    torch.testing.assert_close(got.sum(), V.sum(), rtol=1e-12, atol=0)


def test_second_moments_of_a_permuted_subspace_change():
    # a sorted subspace refresh: permute the columns, then rotate the columns I only
    g = torch.Generator().manual_seed(1)
    m, n = 5, 3
    V = torch.rand(m, n, generator=g) + 0.1
    QL, QR = orthogonal(m, g), orthogonal(n, g)
    perm, index = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 3, 4])
    O = orthogonal(3, g)
    QL_new = QL[:, perm].clone()
    QL_new[:, index] = QL_new[:, index] @ O
    change = BasisChange(perm=perm, index=index, coord_map=O.T)
    torch.testing.assert_close(change.second_moments(V, 0),
                               map_second_moment(V, [QL, QR], [QL_new, QR]), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- SOAP trajectories
SOAP_KW = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=2)


@pytest.mark.parametrize("second_moment", ["keep", "map"])
@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_soap_late_start_matches_dense_reference(method, second_moment):
    # start 3: steps 0-3 are Adam in the identity basis, the eigh basis comes at the end of
    # step 3 (Ṽ mapped into it whatever the option), refreshes follow at steps 5, 7, 9
    shape, Gs = (5, 4), grads((5, 4), 10)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours, _ = run_ours(SOAP, W0, Gs, basis_update=method, start_preconditioning_step=3,
                       second_moment=second_moment, **SOAP_KW)
    ref = DenseSOAP(shape, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=2,
                    method=method, start=3, second_moment=second_moment)
    assert_follows(ours, ref, W0, Gs, rtol=1e-9, atol=1e-11)


def test_soap_late_start_maps_the_second_moment_one_sided():
    # the right axis exceeds max_preconditioner_dim and stays the identity
    shape, Gs = (3, 6), grads((3, 6), 7, seed=3)
    W0 = torch.zeros(shape)
    ours, _ = run_ours(SOAP, W0, Gs, max_preconditioner_dim=4, start_preconditioning_step=2,
                       **SOAP_KW)
    ref = DenseSOAP(shape, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=2, right=False,
                    start=2)
    assert_follows(ours, ref, W0, Gs, rtol=1e-9, atol=1e-11)


def test_soap_map_from_the_first_step_matches_dense_reference():
    # second_moment="map" with the reference's step-0 initialisation: every refresh maps Ṽ
    shape, Gs = (4, 5), grads((4, 5), 9, seed=4)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ours, _ = run_ours(SOAP, W0, Gs, second_moment="map", **SOAP_KW)
    ref = DenseSOAP(shape, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=2,
                    second_moment="map")
    assert_follows(ours, ref, W0, Gs, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- KL trajectories
@pytest.mark.parametrize("second_moment", ["keep", "map"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2)])
def test_klsoap_late_start_matches_dense_reference(shape, second_moment):
    Gs = grads(shape, 9, seed=6)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, opt = run_ours(KLSOAP, W0, Gs, precondition_frequency=2, start_preconditioning_step=3,
                         second_moment=second_moment, **kw)
    ref = DenseKL(shape, lr=0.02, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=2, soap=True,
                  start=3, second_moment=second_moment)
    assert_follows(ours, ref, W0, Gs, rtol=1e-8, atol=1e-10)
    # the reference's bases agree with the library's up to column signs, to which Ṽ is blind
    block = opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]
    torch.testing.assert_close(block["exp_avg_sq"], ref.V, rtol=1e-8, atol=1e-12)


def test_klshampoo_late_start_matches_dense_reference():
    shape, Gs = (5, 4), grads((5, 4), 8, seed=8)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ours, _ = run_ours(KLShampoo, W0, Gs, lr=0.02, betas=(0.9, 0.95), weight_decay=0.0,
                       precondition_frequency=2, start_preconditioning_step=2)
    ref = DenseKL(shape, lr=0.02, betas=(0.9, 0.95), eps=1e-8, wd=0.0, freq=2, start=2)
    assert_follows(ours, ref, W0, Gs, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("cls", [SOAP, KLSOAP])
def test_second_moment_option_is_checked(cls):
    p = [nn.Parameter(torch.zeros(3, 2))]
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: second_moment must be one of \('keep', "
                                         r"'map'\); got 'rotate'"):
        cls(p, second_moment="rotate")
    opt = cls(p)
    with pytest.raises(ValueError, match=rf"{name}: second_moment must be one of"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))],
                             "second_moment": "reset"})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["second_moment"] == "keep"


def test_klshampoo_has_no_second_moment_option():
    # KL-Shampoo has no Adam second moment to map
    with pytest.raises(TypeError, match="second_moment"):
        KLShampoo([nn.Parameter(torch.zeros(3, 2))], second_moment="map")


# --------------------------------------------------------------------------- state dicts
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


MAKERS = {"soap": SOAP, "klsoap": KLSOAP}


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("second_moment", ["keep", "map"])
@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("saved_at", [2, 4])  # before and after the late start (step 3)
def test_resume_across_the_late_start_is_bit_for_bit(name, second_moment, state_dtype,
                                                     saved_at):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(8)]

    def make(params):
        return MAKERS[name](params, lr=1e-2, precondition_frequency=2,
                            start_preconditioning_step=3, second_moment=second_moment,
                            state_dtype=state_dtype)

    torch.manual_seed(0)
    model = Net().float()
    opt = make(model.parameters())
    _train(model, opt, [(x.float(), y.float()) for x, y in data[:saved_at]])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = Net().float()
    fresh.load_state_dict(saved["model"])
    fresh_opt = make(fresh.parameters())
    fresh_opt.load_state_dict(saved["opt"])
    rest = [(x.float(), y.float()) for x, y in data[saved_at:]]
    _train(model, opt, rest)
    _train(fresh, fresh_opt, rest)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_state_dict_without_the_option_resumes_as_keep():
    # state dicts saved before the option existed have no "second_moment" in their groups
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(6)]
    torch.manual_seed(0)
    model = Net()
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=2)
    _train(model, opt, data[:3])
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["second_moment"]
    fresh = Net()
    fresh.load_state_dict(model.state_dict())
    fresh_opt = SOAP(fresh.parameters(), lr=1e-2, precondition_frequency=2)
    fresh_opt.load_state_dict(state)
    _train(model, opt, data[3:])
    _train(fresh, fresh_opt, data[3:])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
