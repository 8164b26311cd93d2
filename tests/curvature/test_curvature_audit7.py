"""Seventh-session regressions of the data engine shared by every curvature operator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvkit.curvature import GGN, KFAC, EmpiricalFisher, Hessian


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x


@pytest.mark.parametrize("cls", [GGN, Hessian, EmpiricalFisher, KFAC])
@pytest.mark.parametrize("check", [True, False])
def test_a_model_returning_a_tuple_is_refused_by_name(cls, check):
    # The determinism check used to fail with "'tuple' object has no attribute 'double'".
    data = [(torch.randn(4, 3), torch.randn(4, 2))]
    with pytest.raises(ValueError, match=f"{cls.__name__}: the model must return one output "
                                         "tensor.*returned a tuple"):
        op = cls(TupleOutput(), nn.MSELoss(), data, check_deterministic=check)
        op @ torch.randn(op.shape[1])
