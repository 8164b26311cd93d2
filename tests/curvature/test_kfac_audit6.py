"""KFAC audit 6: less-tested layer settings against dense float64 references and by hand."""

import pytest
import torch
from kfac_cases import FunctionalReuse, regression_data
from torch import nn

from curvkit.curvature.kfac import KFAC


def float32_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).float()


@pytest.mark.parametrize("fisher", ["type2", "empirical", "mc"])
def test_float32_convolutions_pass_the_weight_tying_check(fisher):
    # A plain float32 CNN: autograd's conv bias gradient sums 64·32·32 rows with a round-off of
    # about 4e-4 relative, which the check took for a second use of the parameter.
    model = float32_cnn()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, 32, 32, generator=g, dtype=torch.float32) + 1
    y = torch.randint(0, 3, (64,), generator=g)
    K = KFAC(model, nn.CrossEntropyLoss(), [(X, y)], fisher=fisher)
    assert K.dtype == torch.float32 and set(K.factors) == {"0", "2", "5"}


def test_float32_functional_reuse_still_raises():
    data = [(x.float(), y.float()) for x, y in regression_data((3,), (3,))]
    with pytest.raises(ValueError, match="not accounted for"):
        KFAC(FunctionalReuse().float(), nn.MSELoss(), data)



def test_embedding_max_norm_is_refused_before_any_forward_touches_the_weight():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, max_norm=0.5)
    with torch.no_grad():
        emb.weight.mul_(10)  # rows far above max_norm: a forward would shrink them in place
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6, 2))
    before = emb.weight.detach().clone()
    data = [(torch.randint(0, 6, (4, 2)), torch.randn(4, 2))]
    with pytest.raises(ValueError, match="max_norm rewrites its weight"):
        KFAC(model, nn.MSELoss(), data)
    assert torch.equal(emb.weight, before)
