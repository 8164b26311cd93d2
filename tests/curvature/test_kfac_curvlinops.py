"""Cross-check against curvlinops's KFAC where its conventions match (skipped without it)."""

import warnings

import pytest
import torch
from kfac_cases import class_data
from torch import nn

from curvkit.curvature.kfac import KFAC

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # curvlinops' imports emit torch deprecation warnings
    curvlinops = pytest.importorskip("curvlinops")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_curvlinops(approx, fisher, reduction):
    m = model()
    data = class_data((2, 4, 4), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    ours = KFAC(m, loss_fn, data, fisher=fisher, approx=approx, separate_bias=True).to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = curvlinops.KFACLinearOperator(
            m, loss_fn, list(m.parameters()), data, fisher_type=fisher.replace("type2", "type-2"),
            kfac_approx=approx, separate_weight_and_bias=True, check_deterministic=False)
        ref = theirs @ torch.eye(ours.shape[0])
    torch.testing.assert_close(ours, ref)
