"""EKFAC against dense float64 GGN references."""

import pytest
import torch
from kfac_cases import class_data, dense_ggn, layer_mask, param_slices
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))


def test_eigenvalues_are_the_ggn_second_moments_in_the_kfac_basis():
    model = mlp()
    data = class_data((4,), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss()
    E = EKFAC(model, loss_fn, data)
    K = KFAC(model, loss_fn, data)
    R = dense_ggn(model, loss_fn, data)
    slices = param_slices(model)
    dense = E.to_dense()
    for i, name in ((0, "0.weight"), (2, "2.weight")):
        f = K.factors[str(i)]
        Q = torch.kron(torch.linalg.eigh(f["G"][0])[1], torch.linalg.eigh(f["A"][0])[1])
        B = R[slices[name], slices[name]]
        ref = Q @ torch.diag((Q.T @ B @ Q).diagonal()) @ Q.T
        torch.testing.assert_close(dense[slices[name], slices[name]], ref)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def token_model():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, t):
            return self.head(torch.tanh(self.lin(self.embed(t))).mean(1))

    return M()


@pytest.mark.parametrize("case", ["cnn", "tokens"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_ekfac_closer_to_ggn_than_kfac(case, separate_bias):
    loss_fn = nn.CrossEntropyLoss()
    if case == "cnn":
        model = cnn()
        data = class_data((2, 4, 4), 3, sizes=(3, 4))
    else:
        model = token_model()
        g = torch.Generator().manual_seed(0)
        data = [(torch.randint(0, 6, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g))
                for n in (3, 4)]
    R = dense_ggn(model, loss_fn, data)
    groups = {}
    for n, _ in model.named_parameters():
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    mask = layer_mask(model, [[n] for n in model.state_dict()] if separate_bias
                      else list(groups.values()))
    K = KFAC(model, loss_fn, data, separate_bias=separate_bias).to_dense()
    E = EKFAC(model, loss_fn, data, separate_bias=separate_bias).to_dense()
    err_k = (K - R * mask).norm()
    err_e = (E - R * mask).norm()
    assert err_e < 0.9 * err_k
    # and block by block
    for names in groups.values():
        m = layer_mask(model, [names])
        assert (E - R)[m].norm() <= (K - R)[m].norm() + 1e-12


def test_inverse_trace_logdet_and_state_dict():
    model = cnn()
    data = class_data((2, 4, 4), 3, sizes=(3,))
    E = EKFAC(model, nn.CrossEntropyLoss(), data, fisher="mc", mc_samples=2)
    D = E.to_dense()
    P = D.shape[0]
    lam = 0.1
    x = torch.randn(P, 2)
    torch.testing.assert_close(E.inverse(lam) @ x, torch.linalg.solve(D + lam * torch.eye(P), x))
    torch.testing.assert_close(E.trace(), D.trace())
    torch.testing.assert_close(E.logdet(lam), torch.logdet(D + lam * torch.eye(P)))
    torch.testing.assert_close(E.frobenius_norm(), D.norm())
    F = EKFAC(model, nn.CrossEntropyLoss(), data, fisher="mc", mc_samples=2, compute=False)
    F.load_state_dict(E.state_dict())
    torch.testing.assert_close(F @ x, E @ x)
    with pytest.raises(ValueError, match="exact"):
        E.inverse(lam, heuristic="pi")
    with pytest.raises(ValueError, match="forward_only"):
        EKFAC(model, nn.CrossEntropyLoss(), data, fisher="forward_only")
