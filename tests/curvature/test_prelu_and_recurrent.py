"""Models with modules that torch.func.vmap batches wrongly (PReLU) or cannot batch (RNNs).

PyTorch's batching rule for PReLU's backward, under vmap over examples and vmap over vectors,
returns wrong gradients without an error when the batch has as many examples as there are
vectors (other shapes raise). The exact diagonal of the GGN family ran there: it was up to
20 % off. Such models now take a loop over the examples.
"""

import pytest
import torch
from torch import nn

from curvkit.curvature import GGN, EmpiricalFisher, FisherMC


def prelu_model(channels, outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.PReLU(channels), nn.Linear(3, outputs)).double()


@pytest.mark.parametrize("op", [GGN, FisherMC, EmpiricalFisher])
@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss()])
@pytest.mark.parametrize("n,outputs", [(3, 3), (2, 1), (4, 2)])
def test_exact_diagonal_of_prelu_models(op, loss_fn, n, outputs):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (torch.randn(n, outputs, generator=g, dtype=torch.float64)
         if isinstance(loss_fn, nn.MSELoss) else torch.randint(0, outputs, (n,), generator=g))
    A = op(prelu_model(1 if outputs == 1 else 3, outputs), loss_fn, [(X, y), (X[:1] * 2, y[:1])])
    # to_dense() takes products of columns: one vmap level, which PyTorch batches right
    torch.testing.assert_close(A.diagonal(), A.to_dense().diagonal())


class _FunctionalPReLU(nn.Module):
    """``F.prelu`` outside an ``nn.PReLU`` module: no module type tells the vmap bug."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, 3), nn.Linear(3, 3)
        self.slope = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x):
        return self.lin2(torch.nn.functional.prelu(self.lin1(x), self.slope))


@pytest.mark.parametrize("op", [GGN, EmpiricalFisher])
def test_exact_diagonal_checks_the_first_example_against_autograd(op):
    # vmap runs and is wrong for 3 examples of 3 outputs; the check sends the batch to the loop
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 3, generator=g, dtype=torch.float64)
    A = op(_FunctionalPReLU().double(), nn.MSELoss(), [(X, y)])
    torch.testing.assert_close(A.diagonal(), A.to_dense().diagonal())
