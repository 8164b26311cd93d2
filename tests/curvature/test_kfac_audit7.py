"""KFAC audit 7: the torch.nn modules and model shapes real users feed KFAC / EKFAC.

Each test is a defect that was silently wrong (or failed obscurely) before, or a verdict of the
audit that KFAC was already right, checked against dense float64 references from torch.func.
"""

import warnings

import pytest
import torch
from kfac_cases import MeanOverPositions, dense_ggn, layer_mask, regression_data, seeded
from torch import nn
from torch.nn.utils import parametrizations

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC

NOT_EXAMPLES = "equals the batch size 3 but does not hold the examples"


class _SequenceFirstInside(nn.Module):
    """Batch-first input ``(N, T, 3)``; the layers see it sequence-first, ``(T, N, 3)``."""

    def __init__(self, norm=False):
        super().__init__()
        self.norm = nn.LayerNorm(3) if norm else nn.Identity()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(self.norm(x.transpose(0, 1)))).transpose(0, 1)


def test_sequence_first_layers_with_as_many_positions_as_examples_are_refused():
    # (T, N, D) with T = N passed for batch-first: norm blocks, reduce, example weights and
    # EKFAC then took the positions for the examples, silently.
    data = regression_data((3, 3), (3, 2), sizes=(3,))
    model = seeded(lambda: _SequenceFirstInside(norm=True))
    with pytest.raises(ValueError, match=f"'norm' got .* whose first dimension {NOT_EXAMPLES}"):
        KFAC(model, nn.MSELoss(), data, params=[model.norm.weight, model.norm.bias])
    with pytest.raises(ValueError, match=f"'a' got .* {NOT_EXAMPLES}"):
        KFAC(model, nn.MSELoss(), data, params=[model.a.weight], approx="reduce")
    with pytest.raises(ValueError, match=f"'a' got .* {NOT_EXAMPLES}"):
        EKFAC(model, nn.MSELoss(), data, params=[model.a.weight])
    weighted = [(x, y, torch.tensor([1.0, 2.0, 0.5])) for x, y in data]
    with pytest.raises(ValueError, match=f"'a' got .* {NOT_EXAMPLES}"):
        KFAC(model, nn.MSELoss(), weighted, params=[model.a.weight])


def test_sequence_first_layers_stay_exact_with_expand():
    # What needs no per-example data is still accepted, and exact (deep linear, MSE, outputs
    # per position).
    model = seeded(_SequenceFirstInside)
    data = regression_data((3, 3), (3, 2), sizes=(3,))
    K = KFAC(model, nn.MSELoss(), data).to_dense()
    R = dense_ggn(model, nn.MSELoss(), data)
    mask = layer_mask(model, [["a.weight", "a.bias"], ["b.weight", "b.bias"]])
    torch.testing.assert_close(K, R * mask)


class _SequenceFirstInput(nn.Module):
    """Takes ``(T, N, 3)``; one output per example."""

    def __init__(self):
        super().__init__()
        self.norm, self.lin, self.head = nn.LayerNorm(3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.gain = nn.Parameter(torch.tensor(1.2))

    def forward(self, x):
        return self.head((self.lin(torch.tanh(self.norm(x))) * self.gain).mean(0))


@pytest.mark.parametrize("length", [3, 4])
def test_sequence_first_model_input_is_refused_for_per_example_blocks(length):
    # The examples are along dim 1 (batch_size_fn says how many, not where). With T = N the
    # one-example slices cut positions instead, silently; with T != N every layer looked
    # shared, moved to the other parameters, and vmap failed obscurely.
    model = seeded(_SequenceFirstInput)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(length, 3, 3, generator=g), torch.randn(3, 2, generator=g))]
    opts = dict(batch_size_fn=lambda X: X.shape[1])
    with pytest.raises(ValueError, match="'norm' got an input"):
        KFAC(model, nn.MSELoss(), data, params=[model.norm.weight], **opts)
    with pytest.raises(ValueError, match=r"\['gain'\] get exact per-example.*sequence-first"):
        KFAC(model, nn.MSELoss(), data, params=[model.gain], **opts)
    # expand needs no per-example data: the same factors as with the examples in front
    params = [model.lin.weight, model.head.weight]
    K = KFAC(model, nn.MSELoss(), data, params=params, **opts).to_dense()

    class BatchFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.transpose(0, 1))

    swapped = [(x.transpose(0, 1), y) for x, y in data]
    torch.testing.assert_close(K, KFAC(BatchFirst(), nn.MSELoss(), swapped, params=params).to_dense())


class _PositionalPooledNorm(nn.Module):
    """Token + positional embeddings (of ``torch.arange``), pooled, then a BatchNorm1d over
    ``(N, C)``: in training mode it cannot run one example."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(5, 3), nn.Embedding(4, 3)
        self.norm, self.head = nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, t):
        h = torch.tanh(self.tok(t) + self.pos(torch.arange(t.shape[1])))
        return self.head(self.norm(h.mean(1)))


def test_shared_input_found_when_the_model_cannot_run_one_example():
    # The one-example search failed (BatchNorm1d in training mode) and the positional
    # embedding of 4 positions, a multiple of N = 2, silently got a Kronecker block. The batch
    # twice over (same batch statistics) finds it; its per-example block then needs
    # one-example passes, which the batch statistics refuse clearly.
    model = seeded(_PositionalPooledNorm)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 5, (2, 4), generator=g), torch.randn(2, 2, generator=g))]
    opts = dict(check_deterministic=False)  # training-mode BatchNorm is refused otherwise
    with pytest.raises(ValueError, match=r"\['pos'\] are called on a tensor shared by all"):
        KFAC(model, nn.MSELoss(), data, other="error", **opts)
    with pytest.raises(ValueError, match=r"\['pos.weight'\] get exact per-example.*BatchNorm1d"):
        KFAC(model, nn.MSELoss(), data, params=[model.pos.weight], **opts)
    before = {n: b.clone() for n, b in model.norm.named_buffers()}
    KFAC(model, nn.MSELoss(), data, params=[model.head.weight], **opts)
    # the probes leave the running statistics as the real passes alone make them
    twin = seeded(_PositionalPooledNorm)
    twin.load_state_dict({**model.state_dict(), **{f"norm.{n}": b for n, b in before.items()}})
    twin.norm(torch.tanh(twin.tok(data[0][0]) + twin.pos(torch.arange(4))).mean(1))
    for n, b in model.norm.named_buffers():
        assert torch.equal(b, twin.norm.get_buffer(n)), n


class _Squeezed(nn.Module):
    """Positional embedding; ``squeeze()`` drops the batch dimension of a single example."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(5, 3), nn.Embedding(4, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, t):
        h = torch.tanh(self.tok(t) + self.pos(torch.arange(t.shape[1]))).mean(1).squeeze()
        return self.head(torch.cat([h, h.flip(1)], dim=1))


def test_shared_input_of_a_model_that_squeezes_the_batch_is_refused_clearly():
    model = seeded(_Squeezed)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 5, (2, 4), generator=g), torch.randn(2, 2, generator=g))]
    with pytest.raises(ValueError, match=r"\['pos.weight'\].*torch.func.vmap over one-example"):
        KFAC(model, nn.MSELoss(), data, params=[model.pos.weight])
    KFAC(model, nn.MSELoss(), data, params=[model.tok.weight])  # per-example: still a layer


class _Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([0.7, 1.3]))

    def forward(self, x):
        return x * self.gain.reshape(1, -1, 1, 1)


def test_batchnorm_without_running_statistics_refuses_per_example_blocks():
    # track_running_stats=False normalises with batch statistics even in eval mode; the other
    # parameters' one-example passes normalised each example by its own statistics instead.
    model = seeded(lambda: nn.Sequential(_Gain(), nn.Conv2d(2, 2, 3, padding=1),
                                         nn.BatchNorm2d(2, track_running_stats=False),
                                         nn.Flatten(), nn.Linear(32, 2))).eval()
    data = regression_data((2, 4, 4), (2,), sizes=(3,))
    with pytest.raises(ValueError, match=r"\['0.gain'\] get exact.*batch statistics"):
        KFAC(model, nn.MSELoss(), data, other="dense", check_deterministic=False)


class _Autocast(nn.Module):
    def __init__(self, enabled=True):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.enabled = enabled

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            h = self.a(x)
        return self.b(h.to(x.dtype))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_layers_under_autocast_get_factors_in_the_parameters_dtype(cls):
    # bfloat16 output gradients of the autocast layer met float32 inputs: an einsum dtype
    # error in the first-batch check, or a Kronecker block of mixed dtypes without it.
    model = seeded(_Autocast).float()
    data = regression_data((3,), (2,))
    data32 = [(x.float(), y.float()) for x, y in data]
    K = cls(model, nn.MSELoss(), data32)
    assert {t.dtype for f in K.factors.values() for t in f.values()} == {torch.float32}
    exact = _Autocast(enabled=False)
    exact.load_state_dict(model.state_dict())
    R = dense_ggn(exact.double(), nn.MSELoss(), data)  # deep linear, MSE: KFAC is exact
    mask = layer_mask(exact, [["a.weight", "a.bias"], ["b.weight", "b.bias"]])
    torch.testing.assert_close(K.to_dense().double(), R * mask, rtol=0, atol=2e-2 * R.abs().max())

    class ReusedUnderAutocast(nn.Module):  # the check for weight tying still sees a reuse
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.conv(x)
                return nn.functional.conv1d(h, self.conv.weight, padding=1).float().flatten(1)

    g = torch.Generator().manual_seed(0)
    signals = [(torch.randn(4, 2, 200, generator=g), torch.randn(4, 400, generator=g))]
    with pytest.raises(ValueError, match="'conv.weight' is not accounted for"):
        cls(seeded(ReusedUnderAutocast).float(), nn.MSELoss(),
            [(x.float(), y.float()) for x, y in signals])


def test_data_parallel_and_non_tensor_outputs_are_refused_clearly():
    data = regression_data((3,), (2,))
    with pytest.raises(ValueError, match=r"DataParallel.*model\.module"):
        KFAC(nn.DataParallel(nn.Linear(3, 2)), nn.MSELoss(), data)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(ValueError, match="must return one output tensor.*returned a tuple"):
        KFAC(Pair(), nn.MSELoss(), data, check_deterministic=False)


# ------------------------------------------------------------------ verdicts: already right
def _parametrized(kind):
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    if kind == "weight_norm":
        parametrizations.weight_norm(model[0])
    elif kind == "orthogonal":
        parametrizations.orthogonal(model[0])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model[0]).eval()
    else:  # old style: weight_g, weight_v and a forward pre-hook (deprecated)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "spectral_norm", "old_weight_norm"])
def test_parametrized_weights_get_exact_other_blocks(kind):
    # The Kronecker factors describe the computed weight, not parametrizations.weight.original*:
    # those parameters are "other" (exact), the bias keeps its Kronecker block.
    model = _parametrized(kind)
    data = regression_data((3,), (2,))
    K = KFAC(model, nn.MSELoss(), data, other="dense")
    names = [n for n, _ in model.named_parameters()]
    originals = [n for n in names if n.startswith("0.") and n != "0.bias"]
    assert K.others == originals and [s.path for s in K.specs] == ["0", "1"]
    mask = layer_mask(model, [["0.bias"], ["1.weight", "1.bias"], *[[n] for n in originals]])
    torch.testing.assert_close(K.to_dense(), dense_ggn(model, nn.MSELoss(), data) * mask)


@pytest.mark.parametrize("make", [
    lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
    lambda: nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=True)])
def test_transformer_layers_in_eval_take_no_fast_path_around_the_hooks(make):
    # Eval mode could run PyTorch's fused kernel, which bypasses the Linear modules' forward;
    # with gradients required it does not, so eval gives train's (dropout 0) factors.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = make(), nn.Linear(4, 2)

        def forward(self, x):
            h = self.layer(x) if isinstance(self.layer, nn.TransformerEncoderLayer) else \
                self.layer(x, x)
            return self.head(h.mean(1))

    model = seeded(Model)
    data = regression_data((3, 4), (2,), sizes=(2, 3))
    train = KFAC(model.train(), nn.MSELoss(), data, other="dense")
    evaluated = KFAC(model.eval(), nn.MSELoss(), data, other="dense")
    assert {"layer.linear1", "layer.linear2"} <= {s.path for s in evaluated.specs}
    torch.testing.assert_close(evaluated.to_dense(), train.to_dense(), rtol=0, atol=0)
    # the attention projections are "other": exact blocks of the GGN (one output per example)
    R = dense_ggn(model, nn.MSELoss(), data)
    names = [n for n, _ in model.named_parameters()]
    attn = [n for n in names if "attn" in n]
    assert set(attn) == set(evaluated.others)
    mask = layer_mask(model, [[n] for n in attn])
    torch.testing.assert_close(evaluated.to_dense()[mask], R[mask])


class _FlatTokens(nn.Module):
    """Per-token logits flattened into rows, ``(N·T, V)``, as language models often return."""

    def __init__(self, flat=True):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 5)
        self.flat = flat

    def forward(self, t):
        logits = self.head(self.norm(self.embed(t)))
        return logits.reshape(-1, 5) if self.flat else logits.transpose(1, 2)


def test_probes_keep_models_whose_output_rows_are_not_the_examples():
    # The batch-first test of the probes must not refuse outputs of N·T token rows, nor
    # outputs that couple the examples (a similarity matrix): their layers are batch-first.
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 5, (3, 4), generator=g), torch.randint(0, 5, (3, 4), generator=g)
    model = seeded(_FlatTokens)
    flat = KFAC(model, nn.CrossEntropyLoss(), [(tokens, labels.reshape(-1))], approx="reduce",
                fisher="empirical")
    model.flat = False
    shaped = KFAC(model, nn.CrossEntropyLoss(), [(tokens, labels)], approx="reduce",
                  fisher="empirical")
    torch.testing.assert_close(flat.to_dense(), shaped.to_dense())

    class Similarity(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(3, 4), nn.LayerNorm(4)

        def forward(self, x):
            z = self.norm(self.lin(x))
            return z @ z.T

    x = torch.randn(4, 3, generator=g)
    K = KFAC(seeded(Similarity), nn.CrossEntropyLoss(), [(x, torch.arange(4))], approx="reduce")
    assert [s.path for s in K.specs] == ["lin", "norm"]


def test_type2_over_positions_warns_where_it_reaches_per_example_blocks():
    # Type-2 vectors span all positions of an example; the norm layer's (and other
    # parameters') per-example blocks then carry products between positions: not the GGN's
    # blocks, silently, while the docs call them exact.
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    data = regression_data((5, 3), (5, 2), sizes=(3,))
    with pytest.warns(UserWarning, match=r"over all 5 positions.*\['1.weight', '1.bias'\]"):
        K = KFAC(model, nn.MSELoss(), data)
    mask = layer_mask(model, [["1.weight", "1.bias"]])
    R = dense_ggn(model, nn.MSELoss(), data)
    assert not torch.allclose(K.to_dense()[mask], R[mask], rtol=0.1, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(model, nn.MSELoss(), data, fisher="mc")
        KFAC(model, nn.MSELoss(), data, params=[model[0].weight, model[2].weight])  # per position
        pooled = regression_data((5, 3), (2,), sizes=(3,))
        KFAC(nn.Sequential(*model, MeanOverPositions()), nn.MSELoss(), pooled)  # one term
