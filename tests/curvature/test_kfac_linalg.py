"""KFAC inverse, trace, logdet, Frobenius norm, eigh, state_dict against torch.kron."""

import warnings

import pytest
import torch
from kfac_cases import class_data, regression_data
from torch import nn

from curvkit.curvature.kfac import KFAC


def setup():
    # bias-free layers: the user's flat order is the Kronecker blocks' order
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False))
    data = regression_data((4,), (3,), sizes=(3, 5))
    K = KFAC(model, nn.MSELoss(), data)
    factors = [(K.factors[p]["G"][0], K.factors[p]["A"][0]) for p in ("0", "2")]
    return model, data, K, factors


def block_diag(mats):
    return torch.block_diag(*mats)


def test_products_match_kron_of_the_factors():
    _, _, K, factors = setup()
    ref = block_diag([torch.kron(G, A) for G, A in factors])
    X = torch.randn(ref.shape[0], 3)
    torch.testing.assert_close(K @ X, ref @ X)
    torch.testing.assert_close(K.trace(), ref.trace())
    torch.testing.assert_close(K.diagonal(), ref.diagonal())
    torch.testing.assert_close(K.frobenius_norm(), ref.norm())
    torch.testing.assert_close(K.logdet(), torch.logdet(ref))
    torch.testing.assert_close(K.logdet(0.3), torch.logdet(ref + 0.3 * torch.eye(ref.shape[0])))
    lam, Q = K.eigh()
    Qd = Q @ torch.eye(ref.shape[0])
    torch.testing.assert_close(Qd @ torch.diag(lam) @ Qd.T, ref)
    torch.testing.assert_close(Qd.T @ Qd, torch.eye(ref.shape[0]))


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_inverses(damping):
    _, _, K, factors = setup()
    P = sum(G.shape[0] * A.shape[0] for G, A in factors)
    I = torch.eye(P)
    X = torch.randn(P, 2)
    ref = block_diag([torch.kron(G, A) for G, A in factors])
    exact = K.inverse(damping, exact=True) @ X
    torch.testing.assert_close(exact, torch.linalg.solve(ref + damping * I, X))

    def shifted(M, d):
        return M + d * torch.eye(M.shape[0])

    plain = block_diag([torch.kron(torch.linalg.inv(shifted(G, damping)),
                                   torch.linalg.inv(shifted(A, damping))) for G, A in factors])
    torch.testing.assert_close(K.inverse(damping) @ X, plain @ X)
    if damping:
        blocks = []
        for G, A in factors:
            pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            dA, dG = pi * damping ** 0.5, damping ** 0.5 / pi
            blocks.append(torch.kron(torch.linalg.inv(shifted(G, dG)),
                                     torch.linalg.inv(shifted(A, dA))))
        torch.testing.assert_close(K.inverse(damping, heuristic="pi") @ X, block_diag(blocks) @ X)
    with pytest.raises(ValueError, match="heuristic"):
        K.inverse(damping, heuristic="pi", exact=True)


def test_joint_bias_inverse_and_list_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    K = KFAC(model, nn.CrossEntropyLoss(), class_data((3,), 2))
    P = K.shape[0]
    D = K.to_dense()
    x = torch.randn(P)
    torch.testing.assert_close(K.inverse(0.1, exact=True) @ (D @ x + 0.1 * x), x)
    torch.testing.assert_close(D, D.T)
    v = [torch.randn(*p.shape, 2) for p in model.parameters()]
    out = K @ v
    flat = torch.cat([t.reshape(-1, 2) for t in v])
    torch.testing.assert_close(torch.cat([o.reshape(-1, 2) for o in out]), D @ flat)


def test_cholesky_failure_retries_in_float64_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 2, bias=False)).float()
    # 2 examples in 6 input dimensions: A is singular and float32 Cholesky fails
    data = [(torch.randn(2, 6, dtype=torch.float32), torch.tensor([0, 1]))]
    K = KFAC(model, nn.CrossEntropyLoss(), data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            K.inverse(1e-30)
        except torch.linalg.LinAlgError:
            pass  # also singular in float64: an error, never a silent result
    assert any("float64" in str(w.message) for w in caught)


def test_state_dict_round_trip_and_mismatch():
    model, data, K, _ = setup()
    state = K.state_dict()
    fresh = KFAC(model, nn.MSELoss(), data, compute=False)
    fresh.load_state_dict(state)
    X = torch.randn(K.shape[0], 2)
    torch.testing.assert_close(fresh @ X, K @ X)
    torch.testing.assert_close(fresh.inverse(0.1) @ X, K.inverse(0.1) @ X)
    other = KFAC(model, nn.MSELoss(), data, fisher="mc", compute=False)
    with pytest.raises(ValueError, match="options differ"):
        other.load_state_dict(state)
    sub = KFAC(model, nn.MSELoss(), data, params=[model[0].weight], compute=False)
    with pytest.raises(ValueError, match="parameters differ"):
        sub.load_state_dict(state)


def test_params_subset_and_progress_bar():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = class_data((3,), 2)
    full = KFAC(model, nn.CrossEntropyLoss(), data)
    sub = KFAC(model, nn.CrossEntropyLoss(), data, params=[model[2].weight, model[2].bias],
               progress=True)
    n0 = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(sub.to_dense(), full.to_dense()[n0:, n0:])
    # only the bias of a layer: its block is the output factor G alone
    bias_only = KFAC(model, nn.CrossEntropyLoss(), data, params=[model[2].bias]).to_dense()
    torch.testing.assert_close(bias_only, full.factors["2"]["G"][0])


def test_params_mapping_evaluates_at_other_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))
    data = class_data((3,), 2)
    shifted = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    at_shifted = KFAC(model, nn.CrossEntropyLoss(), data, params=shifted).to_dense()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shifted[n])
    torch.testing.assert_close(at_shifted, KFAC(model, nn.CrossEntropyLoss(), data).to_dense())
    assert all(p.grad is None for p in model.parameters())
