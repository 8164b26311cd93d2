"""Monte-Carlo gradients of the output losses: drawn from the model's likelihood."""

import math

import pytest
import torch
from torch import nn

from curvkit.curvature.losses import output_loss


@pytest.mark.parametrize("layout", ["classes-second", "classes-last-in-memory"])
def test_cross_entropy_labels_follow_the_softmax(layout):
    # Logits (N, C, S); the LM layout is a transposed view of a (N, S, C) tensor.
    g = torch.Generator().manual_seed(0)
    N, C, S, M = 3, 5, 2, 40_000
    if layout == "classes-second":
        logits = torch.randn(N, C, S, generator=g)
    else:
        logits = torch.randn(N, S, C, generator=g).transpose(1, 2)
    y = torch.randint(0, C, (N, S), generator=g)
    loss = output_loss(nn.CrossEntropyLoss(), caller="test", analytic=True)
    G = loss.sample_gradients(logits, y, M, torch.Generator().manual_seed(1))
    assert G.shape == (M, N, C, S)
    p = logits.softmax(dim=1)
    # g = p − e_label: the label is where g < 0, exactly one per draw and term.
    onehot = (p.unsqueeze(0) - G).round()
    assert torch.equal(onehot.sum(dim=2), torch.ones(M, N, S))
    freq = onehot.mean(dim=0)
    # Each frequency is a mean of M Bernoulli(p) draws: 6 standard deviations is a bound that
    # a correct sampler breaks with probability below 1e-8 per entry.
    bound = 6 * torch.sqrt(p * (1 - p) / M) + 1e-12
    assert ((freq - p).abs() <= bound).all(), ((freq - p).abs() / bound).max()
    # E[g gᵀ] is the softmax Hessian diag(p) − p pᵀ, per term.
    gt = G.movedim(2, -1)  # (M, N, S, C)
    second = torch.einsum("mnsc,mnsd->nscd", gt, gt) / M
    pt = p.movedim(1, -1)
    H = torch.diag_embed(pt) - pt.unsqueeze(-1) * pt.unsqueeze(-2)
    assert (second - H).abs().max() < 6 / math.sqrt(M)
