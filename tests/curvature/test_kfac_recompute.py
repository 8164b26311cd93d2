"""What a KFAC compute pays for beyond the factors, and what a recompute skips.

The factor pass counts loss terms and checks class indices and example weights on their
device; the answers are read together once the pass is over (on an accelerator, each read
stalls the launch queue). The errors must be the same as when they were read per batch.
The checks of the model's wiring (gradient coverage, the one-example probe for shared
inputs) run at the first compute only.
"""

import pytest
import torch
from kfac_cases import class_data
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.engine import _read_deferred
from curvkit.curvature.kfac import KFAC

D = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data_with_bad_target(bad, where=1):
    data = [(x.double(), y) for x, y in class_data((4,), 3, sizes=(3, 4, 2))]
    y = data[where][1].clone()
    y[-1] = bad
    data[where] = (data[where][0], y)
    return data


@pytest.mark.parametrize("cls,fisher", [(KFAC, "type2"), (KFAC, "mc"), (KFAC, "empirical"),
                                        (KFAC, "forward_only"), (EKFAC, "type2"), (EKFAC, "mc"),
                                        (EKFAC, "empirical")])
@pytest.mark.parametrize("bad", [3, -2])
def test_out_of_range_class_index_is_named(cls, fisher, bad):
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, 3\).*got \[{bad}\]"):
        cls(mlp(), loss_fn, data_with_bad_target(bad), fisher=fisher)


def test_the_deferred_checks_end_with_the_pass():
    # After an error the loss reads its checks at once again, and a good run afterwards on the
    # same operator's loss works and counts the same terms.
    op = KFAC(mlp(), nn.CrossEntropyLoss(ignore_index=1), data_with_bad_target(0),
              compute=False)
    op.engine.data = data_with_bad_target(7)
    with pytest.raises(ValueError, match="must lie in"):
        op.compute()
    assert op.engine.loss.pending is None
    op.engine.data = data_with_bad_target(0)
    op.engine._num_terms = None
    op.compute()
    expected = sum(int((y != 1).sum()) for _, y in op.engine.data)
    assert op.engine.num_terms() == expected


def test_ignored_targets_need_not_be_classes():
    data = data_with_bad_target(-100)
    K = KFAC(mlp(), nn.CrossEntropyLoss(), data)
    assert K.engine.num_terms() == 3 + 4 + 2 - 1


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_example_weights_are_named_after_the_pass(bad):
    data = [(x, y, torch.ones(len(y), dtype=D)) for x, y in data_with_bad_target(0)]
    data[2][2][0] = bad
    with pytest.raises(ValueError, match=r"weights must be .*finite entries >= 0; batch 2 has "
                                         r"shape \(2,\), min"):
        KFAC(mlp(), nn.CrossEntropyLoss(), data)


def test_weights_of_the_wrong_shape_are_refused_at_once():
    data = [(x, y, torch.ones(len(y) + 1, dtype=D)) for x, y in data_with_bad_target(0)]
    with pytest.raises(ValueError, match=r"batch 0 has shape \(4,\)"):
        KFAC(mlp(), nn.CrossEntropyLoss(), data)


def test_read_deferred():
    def fails(text):
        return lambda: text

    no, yes = torch.tensor(False), torch.tensor(True)
    assert _read_deferred(5.0, []) == 5.0
    count = _read_deferred(torch.tensor(7.0, dtype=D), [(no, fails("a")), (no, fails("b"))])
    assert count == 7.0 and isinstance(count, float)
    assert _read_deferred(2.0, [(no, fails("a"))]) == 2.0
    with pytest.raises(ValueError, match="^b$"):  # the first failed check, in pass order
        _read_deferred(torch.tensor(7.0, dtype=D), [(no, fails("a")), (yes, fails("b")),
                                                    (yes, fails("c"))])


def test_the_wiring_is_verified_at_the_first_compute_only(monkeypatch):
    # The gradient-coverage check costs an extra backward pass (and a device read per layer):
    # a recompute after a parameter update skips it, as it skips the determinism check.
    from curvkit.curvature.kfac_pass import FactorPass

    calls = []
    verify = FactorPass.verify
    monkeypatch.setattr(FactorPass, "verify", lambda *a: calls.append(1) or verify(*a))
    data = data_with_bad_target(0)
    op = KFAC(mlp(), nn.CrossEntropyLoss(), data)
    before = op.to_dense()
    op.compute()
    assert len(calls) == 1
    torch.testing.assert_close(op.to_dense(), before)
    assert len(KFAC(mlp(), nn.CrossEntropyLoss(), data, check_deterministic=False).factors)
    assert len(calls) == 1


def test_the_shared_input_probe_runs_at_the_first_compute_only(monkeypatch):
    from curvkit.curvature import kfac_pass

    class Positional(nn.Module):  # a table row added to every example: a shared input
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(3, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.table(torch.arange(3)).sum(0))

    probes = []
    probe_inputs = kfac_pass._probe_inputs
    monkeypatch.setattr(kfac_pass, "_probe_inputs",
                        lambda batch: probes.append(1) or probe_inputs(batch))
    torch.manual_seed(0)
    model = Positional().double()
    data = [(x.double(), y) for x, y in class_data((4,), 3, sizes=(3, 4))]
    op = KFAC(model, nn.CrossEntropyLoss(), data)
    assert probes == [1]
    assert "table.weight" in op.others  # its gradient sums over the examples: no Kronecker
    before = op.to_dense()
    op.compute()
    assert probes == [1]
    torch.testing.assert_close(op.to_dense(), before)
