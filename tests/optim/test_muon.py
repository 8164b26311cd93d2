import pytest
import torch
from torch import nn

from curvkit.optim import Muon, muon_param_groups, newton_schulz


def matrix_with_singular_values(s, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g))[0][:, : len(s)]
    V = torch.linalg.qr(torch.randn(n, n, generator=g))[0][:, : len(s)]
    return U @ torch.diag(s) @ V.T, U, V


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_newton_schulz_singular_values_in_band(shape):
    s = torch.logspace(0, -2, 6)
    s = s / s.norm() * 3.0  # relative to the Frobenius norm: from 1e-2 up
    Y, U, V = matrix_with_singular_values(s, *shape)
    O = newton_schulz(Y, dtype=torch.float64)
    sv = torch.linalg.svdvals(O)
    assert sv.min() >= 0.68 and sv.max() <= 1.13, sv
    # same singular vectors as the SVD: UᵀOV is diagonal
    core = U.T @ O @ V
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-10


def test_cubic_newton_schulz_converges_to_polar_factor():
    Y, U, V = matrix_with_singular_values(torch.tensor([1.0, 0.5, 0.2, 0.1]), 5, 4, seed=1)
    O = newton_schulz(Y, steps=60, coefficients=(1.5, -0.5, 0.0), dtype=torch.float64)
    torch.testing.assert_close(O, U @ V.T)


def test_newton_schulz_invariances():
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(5, 7, generator=g)
    U1 = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    U2 = torch.linalg.qr(torch.randn(7, 7, generator=g))[0]
    O = newton_schulz(Y, dtype=torch.float64, eps=0.0)
    torch.testing.assert_close(newton_schulz(3.7 * Y, dtype=torch.float64, eps=0.0), O)
    torch.testing.assert_close(newton_schulz(U1 @ Y @ U2.T, dtype=torch.float64, eps=0.0),
                               U1 @ O @ U2.T)
    with pytest.raises(ValueError, match="newton_schulz: Y must be a matrix"):
        newton_schulz(torch.zeros(3))


def hand_ns(X, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if tall else X


def test_muon_step_matches_hand_written_reference():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(6, 4, generator=g)
    Gs = [torch.randn(6, 4, generator=g) for _ in range(4)]
    W = nn.Parameter(W0.clone())
    opt = Muon([W], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=None)
    ref, B = W0.clone(), torch.zeros(6, 4)
    for G in Gs:
        W.grad = G.clone()
        opt.step()
        B = 0.9 * B + 0.1 * G
        Y = 0.1 * G + 0.9 * B
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * (6 / 4) ** 0.5 * hand_ns(Y)
        torch.testing.assert_close(W.detach(), ref)


def test_muon_matches_torch_muon_in_float32():
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(16, 8, generator=g)
    Gs = [torch.randn(16, 8, generator=g) for _ in range(3)]
    ours, theirs = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    a = Muon([ours], lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    for G in Gs:
        ours.grad, theirs.grad = G.clone(), G.clone()
        a.step()
        b.step()
    # both orthogonalise in bfloat16; only the normalisation guard differs
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=2e-3)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 11)

    def forward(self, x):
        h = self.embed(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(torch.relu(self.hidden(h))))


def test_muon_param_groups_and_adamw_part():
    model = TinyLM()
    groups = muon_param_groups(model)
    assert {id(p) for p in groups[0]["params"]} == {id(model.hidden.weight), id(model.conv.weight)}
    assert groups[1]["use_muon"] is False and len(groups[1]["params"]) == 7
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = Muon(groups, lr=0.02, adamw_lr=1e-2, adamw_betas=(0.9, 0.99), adamw_eps=1e-8,
               adamw_weight_decay=0.1)
    rest = [p for n, p in twin.named_parameters() if n not in ("hidden.weight", "conv.weight")]
    ref = torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # the same gradients go to both optimizers
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for n, p in twin.named_parameters():
        if n not in ("hidden.weight", "conv.weight"):
            torch.testing.assert_close(dict(model.named_parameters())[n], p)
    assert not torch.allclose(model.conv.weight, twin.conv.weight)


def test_muon_validation():
    with pytest.raises(ValueError, match="Muon: use_muon=True needs parameters with >= 2"):
        Muon([nn.Parameter(torch.zeros(3))], use_muon=True)
    with pytest.raises(ValueError, match=r"Muon: momentum must be in \[0.0, 1.0\); got 1.0"):
        Muon([nn.Parameter(torch.zeros(3, 3))], momentum=1.0)
