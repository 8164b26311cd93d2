"""KFAC for convolutions, embeddings, norm layers, other parameters and weight tying."""

import copy

import pytest
import torch
from kfac_cases import (
    ChannelsLast,
    FunctionalReuse,
    WithFreeParameters,
    class_data,
    dense_ggn,
    layer_mask,
    regression_data,
)
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC
from curvkit.curvature.kfac_pass import FactorPass

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SPATIAL = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}
CONV_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=2, stride=2, padding=1),
    dict(kernel_size=2, dilation=2, padding=1, groups=2),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
]


def groups_of(model):
    groups = {}
    for n, _ in model.named_parameters():
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    return list(groups.values())


def assert_layer_blocks(K, R, model, groups=None):
    mask = layer_mask(model, groups or groups_of(model))
    torch.testing.assert_close(K[mask], R[mask])
    assert (K[~mask] == 0).all()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_conv_expand_exact_for_per_pixel_outputs(dim, options):
    # A conv whose output pixels each carry their own MSE terms (channels last): every output
    # pixel sees only its own patch, the expand case of Eschenhagen et al. (2023).
    torch.manual_seed(0)
    model = nn.Sequential(CONV[dim](2, 4, **options), ChannelsLast())
    with torch.no_grad():
        out_shape = model(torch.zeros(1, 2, *SPATIAL[dim])).shape[1:]
    data = regression_data((2, *SPATIAL[dim]), out_shape, sizes=(2, 3))
    loss_fn = nn.MSELoss()
    K = KFAC(model, loss_fn, data, approx="expand").to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("options", CONV_OPTIONS[:3], ids=lambda o: "-".join(map(str, o.values())))
def test_conv_reduce_exact_before_global_pooling(dim, options):
    # Global average pooling makes the output gradient the same at every pixel: reduce is exact.
    torch.manual_seed(0)
    model = nn.Sequential(CONV[dim](2, 4, **options), POOL[dim](1), nn.Flatten(), nn.Linear(4, 3))
    data = regression_data((2, *SPATIAL[dim]), (3,), sizes=(2, 3))
    loss_fn = nn.MSELoss(reduction="sum")
    K = KFAC(model, loss_fn, data, approx="reduce").to_dense()
    R = dense_ggn(model, loss_fn, data)
    # one Kronecker block per convolution group: rows of W (and b) of output channels 2j, 2j+1
    conv = model[0]
    groups, w_size = conv.groups, conv.weight.numel()
    per_row = w_size // conv.out_channels
    mask = layer_mask(model, [["3.weight", "3.bias"]])
    rows = torch.arange(conv.out_channels).reshape(groups, -1)
    for j in range(groups):
        ix = torch.cat([(rows[j].unsqueeze(1) * per_row + torch.arange(per_row)).reshape(-1),
                        w_size + rows[j]])
        mask[ix.unsqueeze(1), ix.unsqueeze(0)] = True
    torch.testing.assert_close(K[mask], R[mask])
    assert (K[~mask] == 0).all()


class TokenRegression(nn.Module):
    """Embedding → Linear per token; outputs ``(N, S, D)`` with per-token MSE."""

    def __init__(self, vocab=6, width=3, out=2, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.head = nn.Linear(width, out)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_expand_exact_for_per_token_outputs(padding_idx):
    torch.manual_seed(0)
    model = TokenRegression(padding_idx=padding_idx)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 6, (n, 5), generator=g), torch.randn(n, 5, 2, generator=g))
            for n in (2, 3)]
    loss_fn = nn.MSELoss()
    K = KFAC(model, loss_fn, data).to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)



def test_embedding_int32_indices_sparse_gradients_and_scaled_gradients():
    # nn.Embedding takes int32 indices and may return sparse weight gradients: same factors.
    torch.manual_seed(0)
    model = TokenRegression()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 6, (n, 5), generator=g), torch.randn(n, 5, 2, generator=g))
            for n in (2, 3)]
    loss_fn = nn.MSELoss()
    ref = KFAC(model, loss_fn, data).to_dense()
    as_int32 = [(t.int(), y) for t, y in data]
    torch.testing.assert_close(KFAC(model, loss_fn, as_int32).to_dense(), ref)
    model.embed.sparse = True
    torch.testing.assert_close(KFAC(model, loss_fn, data).to_dense(), ref)
    model.embed.scale_grad_by_freq = True  # the gradient depends on the batch's token counts
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        KFAC(model, loss_fn, data)


NORMS = {
    "layernorm": lambda: nn.LayerNorm(4),
    "layernorm_nobias": lambda: nn.LayerNorm(4, bias=False),
    "rmsnorm": lambda: nn.RMSNorm(4),
    "groupnorm": lambda: nn.GroupNorm(2, 4),
    "batchnorm": lambda: nn.BatchNorm1d(4).eval(),
}


def norm_model(norm, seq):
    torch.manual_seed(0)
    layer = NORMS[norm]()
    with torch.no_grad():  # away from the initial γ = 1, β = 0 and default running stats
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if isinstance(layer, nn.BatchNorm1d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
    body = [nn.Linear(3, 4), layer, nn.Tanh()]
    if seq:
        return nn.Sequential(*body, MeanTokens(), nn.Linear(4, 3))
    return nn.Sequential(*body, nn.Linear(4, 3))


class MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("separate_bias", [False, True])
def test_norm_blocks_equal_the_ggn_blocks(norm, separate_bias):
    # One output term per example: the per-example affine gradients of every column of the
    # output-Hessian square root are exact, so the norm block is the GGN block itself.
    seq = norm in ("layernorm", "rmsnorm")
    model = norm_model(norm, seq)
    data = class_data((5, 3) if seq else (3,), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss()
    K = KFAC(model, loss_fn, data, separate_bias=separate_bias).to_dense()
    R = dense_ggn(model, loss_fn, data)
    norm_names = [n for n, _ in model.named_parameters() if n.startswith("1.")]
    groups = [[n] for n in norm_names] if separate_bias else [norm_names]
    mask = layer_mask(model, groups)
    torch.testing.assert_close(K[mask], R[mask])


@pytest.mark.parametrize("other", ["diagonal", "dense"])
def test_other_parameters_are_exact_from_the_same_vectors(other):
    torch.manual_seed(0)
    model = WithFreeParameters()
    data = class_data((3,), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss()
    K = KFAC(model, loss_fn, data, other=other).to_dense()
    R = dense_ggn(model, loss_fn, data)
    groups = [["scale"], ["shift"]]
    mask = layer_mask(model, groups)
    if other == "dense":
        torch.testing.assert_close(K[mask], R[mask])
    else:
        diag = torch.zeros_like(mask)
        diag[mask.diagonal().nonzero(), mask.diagonal().nonzero()] = True
        torch.testing.assert_close(K[diag], R[diag])
        assert (K[mask & ~diag] == 0).all()
    with pytest.raises(ValueError, match="scale"):
        KFAC(model, loss_fn, data, other="error")



@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_only_other_parameters_selected(cls):
    # No hooked layer: the pass has no gradient edges to ask autograd for.
    torch.manual_seed(0)
    model = WithFreeParameters()
    data = class_data((3,), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss()
    names = ["scale", "shift"]
    K = cls(model, loss_fn, data, params=[model.scale, model.shift], other="dense").to_dense()
    R = dense_ggn(model, loss_fn, data, names=names)
    torch.testing.assert_close(K, R * torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)))


def test_multihead_attention_projection_falls_to_other():
    # nn.MultiheadAttention calls F.linear with out_proj.weight: its hook never fires.
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().eval()
    data = class_data((3, 4), 3, sizes=(2, 3))
    loss_fn = nn.CrossEntropyLoss()
    K = KFAC(model, loss_fn, data, other="dense")
    R = dense_ggn(model, loss_fn, data)
    names = [n for n, _ in model.named_parameters() if n.startswith("attn.")]
    mask = layer_mask(model, [[n] for n in names])
    torch.testing.assert_close(K.to_dense()[mask], R[mask])
    assert set(K.others) == set(names)


def test_tied_weights_across_modules_raise():
    model = TokenRegression(vocab=4, width=3, out=4)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, 3)
            self.head = nn.Linear(3, 4, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t):
            return self.head(self.embed(t)).transpose(1, 2)

    data = [(torch.randint(0, 4, (2, 5)), torch.randint(0, 4, (2, 5)))]
    with pytest.raises(ValueError, match="weight tying"):
        KFAC(Tied(), nn.CrossEntropyLoss(), data)
    del model


def test_functional_reuse_of_a_layer_weight_raises():
    data = regression_data((3,), (3,))
    with pytest.raises(ValueError, match="not accounted for"):
        KFAC(FunctionalReuse(), nn.MSELoss(), data)



def test_layer_skipped_in_a_later_batch_raises():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x.shape[0] == 3 else self.b(x)

    data = regression_data((3,), (2,), sizes=(3, 4))
    with pytest.raises(ValueError, match=r"\['a'\] were called in the first batch but not in batch 1"):
        KFAC(Branches(), nn.MSELoss(), data)


def test_module_called_twice_counts_both_calls_as_positions():
    # The same Linear applied to two halves equals one weight-shared Linear over 2 positions.
    torch.manual_seed(0)
    shared = nn.Linear(3, 2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = shared

        def forward(self, x):
            return torch.stack([self.lin(x[:, :3]), self.lin(x[:, 3:])], dim=1)

    class AsSequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = shared

        def forward(self, x):
            return self.lin(x.reshape(x.shape[0], 2, 3))

    data = regression_data((6,), (2, 2))
    for approx in ("expand", "reduce"):
        a = KFAC(Twice(), nn.MSELoss(), data, approx=approx).to_dense()
        b = KFAC(AsSequence(), nn.MSELoss(), data, approx=approx).to_dense()
        torch.testing.assert_close(a, b)
    # expand with per-position outputs is exact here
    assert_layer_blocks(KFAC(Twice(), nn.MSELoss(), data).to_dense(),
                        dense_ggn(Twice(), nn.MSELoss(), data), Twice())


def test_forward_only_refuses_norm_and_other_parameters():
    model = norm_model("layernorm", seq=False)
    data = class_data((3,), 3)
    with pytest.raises(ValueError, match="forward_only"):
        KFAC(model, nn.CrossEntropyLoss(), data, fisher="forward_only")


def test_mapping_inputs_match_tensor_inputs():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    scale = nn.Parameter(torch.tensor(0.7))

    class FromDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.scale = body, scale

        def forward(self, X):  # with entries that are not per example, as HF flags are
            out = self.body(torch.cat([X["a"], X["b"]], dim=1)) * self.scale * X["gain"]
            return out if X["plain"] else out.neg()

    class FromTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.scale = body, scale

        def forward(self, x):
            return self.body(x) * self.scale

    data = class_data((5,), 3)
    as_dict = [({"a": x[:, :3], "b": x[:, 3:], "gain": torch.tensor(1.0), "plain": True}, y)
               for x, y in data]
    a = KFAC(FromDict(), nn.CrossEntropyLoss(), as_dict, other="dense").to_dense()
    b = KFAC(FromTensor(), nn.CrossEntropyLoss(), data, other="dense").to_dense()
    torch.testing.assert_close(a, b)


class TokenConv(nn.Module):
    """Embedding → Conv1d (reflect padding) → Linear per position, wide enough that the factor
    Grams take the host BLAS's symmetric rank-k path."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 32, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(32, 3)

    def forward(self, tokens):
        h = self.conv(self.embed(tokens).transpose(1, 2)).relu()
        return self.head(h.transpose(1, 2))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_integer_weights_equal_duplicated_examples(approx):
    # Weight w_n on example n is the example repeated w_n times (w_n = 0: dropped), for every
    # layer kind at once: one-hot embedding rows, convolution patches, per-position inputs.
    torch.manual_seed(0)
    model = TokenConv()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 11, (40, 32), generator=g)
    Y = torch.randn(40, 32, 3, generator=g)
    w = torch.randint(0, 4, (40,), generator=g)
    loss_fn = nn.MSELoss(reduction="sum")
    K_w = KFAC(model, loss_fn, [(X, Y, w.double())], approx=approx)
    K_d = KFAC(model, loss_fn, [(X.repeat_interleave(w, 0), Y.repeat_interleave(w, 0))],
               approx=approx)
    for layer, factors in K_d.factors.items():
        for name, F in factors.items():
            torch.testing.assert_close(K_w.factors[layer][name], F, msg=f"{layer}.{name}")


class SequenceFirst(nn.Module):
    """Linear layers that see ``(S, N, D)``: the batch is not their leading dimension."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x.transpose(0, 1))).transpose(0, 1)


class FoldedFrames(nn.Module):
    """A Conv1d over ``(N·T, C, L)``: frames folded into the batch dimension."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)

    def forward(self, x):
        N, T = x.shape[:2]
        return self.conv(x.flatten(0, 1)).transpose(1, 2).reshape(N, T, -1, 3)


@pytest.mark.parametrize("case", ["sequence_first", "folded_frames"])
def test_expand_normalises_inputs_not_batch_first(case):
    # Expand averages A over all input rows (N·S); counting N times the positions of the
    # layer's own leading dimension gave A off by S / N here.
    torch.manual_seed(0)
    if case == "sequence_first":
        model, data = SequenceFirst(), regression_data((5, 3), (5, 2), sizes=(2, 3))
    else:
        model, data = FoldedFrames(), regression_data((4, 2, 5), (4, 5, 3), sizes=(2, 3))
    loss_fn = nn.MSELoss()
    K = KFAC(model, loss_fn, data).to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)


def test_layers_called_with_keyword_inputs():
    # The forward hooks must find the input among the keyword arguments too.
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(3, 4), nn.RMSNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(input=self.norm(x=self.a(input=x)))

    torch.manual_seed(0)
    model = Keywords()
    data = regression_data((3,), (2,), sizes=(1,))
    loss_fn = nn.MSELoss()
    K = KFAC(model, loss_fn, data).to_dense()
    assert_layer_blocks(K, dense_ggn(model, loss_fn, data), model)


class SharedInput(nn.Module):
    """A Linear applied to a parameter vector: its input is the same for every example."""

    def __init__(self):
        super().__init__()
        self.code = nn.Parameter(torch.randn(3))
        self.gen, self.lin = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) * self.gen(self.code)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_shared_by_all_examples(approx):
    # Autograd hands back the shared layer's output gradient summed over the examples, so it
    # has no Kronecker factor: its parameters get the exact per-example "other" treatment.
    torch.manual_seed(0)
    model = SharedInput()
    loss_fn = nn.MSELoss()
    data = regression_data((4,), (2,), sizes=(2,))
    for name in ("gen.weight", "gen.bias"):
        p = dict(model.named_parameters())[name]
        K = KFAC(model, loss_fn, data, params=[p], approx=approx, other="dense")
        assert K.others == [name]
        torch.testing.assert_close(K.to_dense(), dense_ggn(model, loss_fn, data, [name]))
    with pytest.raises(ValueError, match=r"\['gen'\] are called on a tensor shared"):
        KFAC(model, loss_fn, data, approx=approx, other="error")
    if approx == "expand":  # with one example the unbatched call is that example's row
        one = regression_data((4,), (2,), sizes=(1,))
        K = KFAC(model, loss_fn, one, other="dense").to_dense()
        assert_layer_blocks(K, dense_ggn(model, loss_fn, one), model)


class _PositionalLM(nn.Module):
    """Token + positional embeddings (of torch.arange, shared by all examples), mean-pooled."""

    def __init__(self, vocab=5, context=4, width=3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, t):
        h = torch.tanh(self.tok(t) + self.pos(torch.arange(t.shape[1])))
        return self.head(h.mean(dim=1))  # one output per example: type-2 is the exact GGN


def test_positional_embedding_shared_by_all_examples_is_exact_as_other():
    """With S a multiple of N the shapes look batched; the one-example pass still finds it."""
    torch.manual_seed(0)
    model = _PositionalLM().double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 5, (2, 4), generator=g), torch.randint(0, 5, (2,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    K = KFAC(model, loss_fn, data, params=[model.pos.weight], other="dense")
    assert K.others == ["pos.weight"]
    torch.testing.assert_close(K.to_dense(), dense_ggn(model, loss_fn, data, ["pos.weight"]))
    with pytest.raises(ValueError, match=r"\['pos'\] are called on a tensor shared by all"):
        KFAC(model, loss_fn, data, other="error")
    # EKFAC's correction pass reuses what its factor pass found: no further one-example
    # forward than KFAC's (the search, the per-example blocks of the other parameters, and
    # the plain-autograd check of their first example)
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    params = [model.pos.weight, model.head.weight]
    KFAC(model, loss_fn, data, params=params, other="dense")
    kfac_singles, sizes[:] = sizes.count(1), []
    E = EKFAC(model, loss_fn, data, params=params, other="dense")
    assert E.others == ["pos.weight"] and sizes.count(1) == kfac_singles == 3


class _PositionalNormLM(_PositionalLM):
    """``_PositionalLM`` with a BatchNorm over the width, in training mode."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, t):
        h = self.tok(t) + self.pos(torch.arange(t.shape[1]))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h).mean(dim=1))


def test_shared_tensor_found_with_batchnorm_in_training_mode():
    torch.manual_seed(0)
    model = _PositionalNormLM().double()
    assert model.training
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 5, (2, 4), generator=g), torch.randint(0, 5, (2,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    opts = dict(check_deterministic=False)  # training-mode BatchNorm is refused otherwise
    with pytest.raises(ValueError, match=r"\['pos'\] are called on a tensor shared by all"):
        KFAC(model, loss_fn, data, other="error", **opts)
    # batch statistics have no per-example blocks for the moved parameters: a clear refusal
    with pytest.raises(ValueError, match=r"\['pos.weight'\] get exact per-example.*BatchNorm1d"):
        KFAC(model, loss_fn, data, other="dense", **opts)
    model.eval()
    K = KFAC(model, loss_fn, data, params=[model.pos.weight], other="dense")
    torch.testing.assert_close(K.to_dense(), dense_ggn(model, loss_fn, data, ["pos.weight"]))


def test_one_example_pass_leaves_batchnorm_statistics_untouched(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = class_data((3,), 2, sizes=(5,))
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    twin = copy.deepcopy(model)
    KFAC(model, nn.CrossEntropyLoss(), data, check_deterministic=False)
    assert 1 in sizes  # the one-example pass ran
    monkeypatch.setattr(FactorPass, "_shared_input_layers", lambda self, batch: [])
    KFAC(twin, nn.CrossEntropyLoss(), data, check_deterministic=False)
    for name, buffer in model[1].named_buffers():
        assert torch.equal(buffer, twin[1].get_buffer(name)), name
    assert model[1].num_batches_tracked.item() >= 1  # the real passes count


class _ViewCNN(nn.Module):
    """A CNN whose forward flattens with ``view``, which a channels-last activation refuses."""

    def __init__(self, flatten_by_view):
        super().__init__()
        self.conv, self.lin = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 4 * 4, 2)
        self.flatten_by_view = flatten_by_view

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.lin(h.view(h.shape[0], -1) if self.flatten_by_view else h.flatten(1))


def test_channels_last_pass_falls_back_for_models_that_need_their_layout():
    """Image batches run channels last (faster on CPU) unless the model refuses that layout."""
    torch.manual_seed(0)
    flat, viewed = _ViewCNN(False).double(), _ViewCNN(True).double()
    viewed.load_state_dict(flat.state_dict())
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 2, (5,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="view"):  # the layout really is refused
        viewed(data[0][0].contiguous(memory_format=torch.channels_last))
    # channels last (flat) against the model's own layout (viewed, after the fallback)
    for cls in (KFAC, EKFAC):
        a = cls(flat, loss_fn, data).to_dense()
        b = cls(viewed, loss_fn, data).to_dense()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class MeanPositions(nn.Module):
    def forward(self, x):
        return x.mean(-1)


@pytest.mark.parametrize("running", [False, True])
def test_instance_norm_blocks_equal_the_ggn_blocks(running):
    # InstanceNorm normalises each example on its own (or with running statistics in eval
    # mode): its affine gradients per example are exact, so its block is the GGN block.
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=running)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(4))
        norm.bias.add_(0.3 * torch.randn(4))
        if running:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Conv1d(3, 4, 1), norm, nn.Tanh(), MeanPositions(), nn.Linear(4, 3))
    model.eval()
    data = class_data((3, 5), 3, sizes=(3, 4))
    loss_fn = nn.CrossEntropyLoss()
    K = KFAC(model, loss_fn, data, other="error").to_dense()  # no longer an "other" parameter
    R = dense_ggn(model, loss_fn, data)
    mask = layer_mask(model, [["1.weight", "1.bias"]])
    torch.testing.assert_close(K[mask], R[mask])
