"""Every curvature operator built on an accelerator equals the same operator built on the CPU.

Each test builds an operator twice, from a CPU float64 copy of a small model and its data and
from a copy moved to the device under test (``device`` fixture, ``CURVKIT_TEST_DEVICE``; set it
to ``cpu`` to check the tests themselves without an accelerator), and compares products and
matrices after ``.cpu()``. Results must live on the device. Monte-Carlo estimators draw from a
generator on the operator's device, so their draws differ between devices: they are compared
statistically, and exactly through ``state_dict`` transfers. Tests of mixed-device inputs need
two different devices and skip when the device under test is the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from cases import DictMLP, TinyLM, cnn2d, lm_data, make_data, mlp
from kfac_cases import class_data, regression_data, seeded
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvkit.curvature import (
    EKFAC,
    GGN,
    KFAC,
    EmpiricalFisher,
    FisherMC,
    Hessian,
    Jacobian,
    SymmetryAveraged,
    sequential_symmetries,
    symmetry_block_diagonal,
)

CPU = torch.device("cpu")
DAMPING = 1e-3


# --------------------------------------------------------------------------- helpers
def move(obj, device, dtype=None):
    """Tensors in nested tuples/lists/dicts moved to ``device`` (floating ones cast to ``dtype``)."""

    def one(t):
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if dtype and t.is_floating_point() else None)

    return tree_map(one, obj)


def twins(model, loss_fn, data, device, dtype=torch.float64):
    """``(model, loss_fn, data)`` on the CPU and on ``device``, both in ``dtype``."""
    out = []
    for dev in (CPU, device):
        out.append(
            (
                copy.deepcopy(model).to(device=dev, dtype=dtype),
                copy.deepcopy(loss_fn).to(device=dev, dtype=dtype),
                move(data, dev, dtype),
            )
        )
    return out


def tolerance(dtype):
    return (1e-8, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)


def close(actual: Tensor, expected: Tensor, device, dtype=torch.float64, scale=None):
    """``actual`` (on ``device``) equals the CPU ``expected``; absolute tolerance relative to it."""
    assert actual.device.type == device.type, (actual.device, device)
    assert expected.device.type == "cpu"
    rtol, atol = tolerance(dtype)
    ref = expected.abs().max().item() if expected.numel() else 1.0
    scale = max(ref, 1e-30) if scale is None else scale
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=atol * scale)


def tangents(shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def check_products(A_cpu, A_dev, device, dtype=torch.float64, *, dense=True, columns=3):
    """Matvec, matmat, list-shaped products (and the dense matrix) agree; results on device."""
    assert A_dev.device.type == device.type and A_cpu.device.type == "cpu"
    assert A_dev.shape == A_cpu.shape and A_dev.dtype == A_cpu.dtype == dtype
    P = A_cpu.shape[1]
    v, V = tangents((P,), 1, dtype), tangents((P, columns), 2, dtype)
    close(A_dev @ v.to(device), A_cpu @ v, device, dtype)
    close(A_dev @ V.to(device), A_cpu @ V, device, dtype)
    if A_cpu.in_shapes is not None:
        parts = [
            t.reshape(s)
            for t, s in zip(v.split([s.numel() for s in A_cpu.in_shapes]), A_cpu.in_shapes)
        ]
        got = A_dev @ [t.to(device) for t in parts]
        want = A_cpu @ parts
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            close(g, w, device, dtype, scale=max(x.abs().max().item() for x in want))
    if dense:
        close(A_dev.to_dense(), A_cpu.to_dense(), device, dtype)


# --------------------------------------------------------------------------- models and data
class Transpose(nn.Module):
    """``(N, S, C)`` → ``(N, C, S)``, logits laid out as ``CrossEntropyLoss`` takes them."""

    def forward(self, x):
        return x.transpose(1, 2)


class Scale(nn.Module):
    """An elementwise scale: a parameter of no supported layer (KFAC's "other")."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.gain


def lm_problem():
    torch.manual_seed(1)
    return TinyLM().eval(), nn.CrossEntropyLoss(ignore_index=3), lm_data(sizes=(2, 3), ignore_index=3)


def dict_problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            {"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)},
            torch.randn(n, 3, generator=g),
        )
        for n in (3, 4)
    ]
    return DictMLP(), nn.MSELoss(), data


def exact_problem(name):
    torch.manual_seed(0)
    if name == "mlp-mse":
        model, loss_fn = mlp(), nn.MSELoss()
    elif name == "mlp-ce-weighted":
        model, loss_fn = mlp(), nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]))
    elif name == "mlp-bce-sum":
        model, loss_fn = mlp(), nn.BCEWithLogitsLoss(reduction="sum")
    elif name == "cnn2d-ce-sum":  # Conv2d, eval-mode BatchNorm, max and average pooling
        model, loss_fn = cnn2d(), nn.CrossEntropyLoss(reduction="sum")
        return model, loss_fn, make_data(model, loss_fn, (2, 4, 4), sizes=(2, 3))
    elif name == "lm-ce-seq":  # embedding, attention, LayerNorm, sequence targets, ignore_index
        return lm_problem()
    elif name == "dict-mse":  # mapping inputs
        return dict_problem()
    else:
        raise KeyError(name)
    return model, loss_fn, make_data(model, loss_fn, (5,), sizes=(3, 5, 2))


EXACT_OPERATORS = {
    "ggn": lambda m, lf, d: GGN(m, lf, d),
    "hessian": lambda m, lf, d: Hessian(m, lf, d),
    "ef": lambda m, lf, d: EmpiricalFisher(m, lf, d),
    "ef-term": lambda m, lf, d: EmpiricalFisher(m, lf, d, grouping="term"),
    "ggn-layer-blocks": lambda m, lf, d: GGN(m, lf, d, blocks="layer"),
}
SMALL = {"mlp-mse", "mlp-ce-weighted", "mlp-bce-sum", "dict-mse"}  # P = 39: dense is cheap


# --------------------------------------------------------------------------- exact operators
@pytest.mark.parametrize("op", list(EXACT_OPERATORS))
@pytest.mark.parametrize(
    "problem",
    ["mlp-mse", "mlp-ce-weighted", "mlp-bce-sum", "cnn2d-ce-sum", "lm-ce-seq", "dict-mse"],
)
def test_exact_operator_matches_cpu(problem, op, device):
    (m_c, l_c, d_c), (m_d, l_d, d_d) = twins(*exact_problem(problem), device)
    A_cpu, A_dev = EXACT_OPERATORS[op](m_c, l_c, d_c), EXACT_OPERATORS[op](m_d, l_d, d_d)
    check_products(A_cpu, A_dev, device, dense=problem in SMALL)
    if op != "hessian":  # exact diagonals of the GGN family (per-example vjps under vmap)
        close(A_dev.diagonal(), A_cpu.diagonal(), device)


def test_hessian_of_weighted_nll_matches_cpu(device):
    torch.manual_seed(0)
    model = nn.Sequential(mlp(), nn.LogSoftmax(dim=1))
    loss_fn = nn.NLLLoss(weight=torch.tensor([0.5, 2.0, 1.0]), ignore_index=1)
    data = make_data(model, nn.CrossEntropyLoss(), (5,), sizes=(3, 5, 2))
    (m_c, l_c, d_c), (m_d, l_d, d_d) = twins(model, loss_fn, data, device)
    check_products(Hessian(m_c, l_c, d_c), Hessian(m_d, l_d, d_d), device)


@pytest.mark.parametrize("op", ["ggn", "hessian", "ef"])
def test_exact_operator_float32_matches_cpu(op, device):
    dtype = torch.float32
    (m_c, l_c, d_c), (m_d, l_d, d_d) = twins(*lm_problem(), device, dtype)
    A_cpu, A_dev = EXACT_OPERATORS[op](m_c, l_c, d_c), EXACT_OPERATORS[op](m_d, l_d, d_d)
    check_products(A_cpu, A_dev, device, dtype, dense=False)


@pytest.mark.parametrize("problem", ["mlp-ce-weighted", "mlp-mse", "mlp-bce-sum", "lm-ce-seq"])
def test_fisher_mc_on_device(problem, device):
    """Draws come from a generator on the device: reproducible there, unbiased for the GGN."""
    model, loss_fn, data = exact_problem(problem)
    if problem == "mlp-ce-weighted":  # the MC Fisher of a class-weighted loss is undefined
        loss_fn = nn.CrossEntropyLoss()
    _, (m, lf, d) = twins(model, loss_fn, data, device)
    F = FisherMC(m, lf, d, mc_samples=2, seed=3)
    V = tangents((F.shape[1], 4), 4).to(device)
    first = F @ V
    assert first.device.type == device.type and first.isfinite().all()
    close(F @ V, first.cpu(), device)  # the same draw at every pass
    assert not torch.allclose(F.resample(seed=4) @ V, first)
    assert ((V * (F @ V)).sum(0) >= -1e-12).all()  # PSD
    diag = F.diagonal()
    assert diag.device.type == device.type and (diag >= 0).all()
    # Unbiased: many labels per term approach the GGN (relative error ~ 1/sqrt(M·terms)).
    G = GGN(m, lf, d) @ V
    many = FisherMC(m, lf, d, mc_samples=2000, seed=5) @ V
    error = ((many - G).norm() / G.norm()).item()
    assert error < 0.1, error


@pytest.mark.parametrize("problem", ["mlp-mse", "cnn2d-ce-sum", "lm-ce-seq", "dict-mse"])
def test_jacobian_matches_cpu(problem, device):
    (m_c, _, d_c), (m_d, _, d_d) = twins(*exact_problem(problem), device)
    J_cpu, J_dev = Jacobian(m_c, d_c), Jacobian(m_d, d_d)
    check_products(J_cpu, J_dev, device, dense=problem in SMALL)
    M = J_cpu.shape[0]
    u, U = tangents((M,), 5), tangents((M, 3), 6)
    close(J_dev.T @ u.to(device), J_cpu.T @ u, device)
    close(J_dev.T @ U.to(device), J_cpu.T @ U, device)
    # Inputs alone, without targets, work as data too.
    inputs = [(X,) for X, _ in d_d]
    W = tangents((J_cpu.shape[1], 2), 7)
    close(Jacobian(m_d, inputs) @ W.to(device), J_cpu @ W, device)


# --------------------------------------------------------------------------- KFAC / EKFAC
def kfac_mlp(loss="ce"):
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), class_data((4,), 3, sizes=(6, 5))
    return model, nn.MSELoss(reduction="sum"), regression_data((4,), (3,), sizes=(6, 5))


def kfac_sequence():
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    return model, nn.MSELoss(), regression_data((5, 3), (5, 2), sizes=(3, 4))


def kfac_conv():
    """Conv2d (padded, strided, grouped), GroupNorm, eval-mode BatchNorm2d, Linear."""

    def build():
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.GroupNorm(1, 3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 2, stride=2),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.Conv2d(4, 4, 1, groups=2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        with torch.no_grad():
            m[4].running_mean.uniform_(-0.5, 0.5)
            m[4].running_var.uniform_(0.5, 1.5)
        return m.eval()

    return seeded(build), nn.CrossEntropyLoss(), class_data((2, 4, 4), 3, sizes=(4, 5))


def token_data(counts=(2, 4, 6, 8, 10), sizes=(2, 4), seq=5, ignore_index=None, seed=0):
    """Tokens with the given (distinct) counts over all data: non-degenerate embedding factors."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([torch.full((c,), v) for v, c in enumerate(counts)])
    tokens = tokens[torch.randperm(len(tokens), generator=g)].reshape(-1, seq)
    assert tokens.shape[0] == sum(sizes)
    y = torch.randint(0, len(counts), tokens.shape, generator=g)
    if ignore_index is not None:
        y[torch.rand(tokens.shape, generator=g) < 0.2] = ignore_index
    return [(X, t) for X, t in zip(tokens.split(list(sizes)), y.split(list(sizes)))]


def kfac_tokens():
    """Embedding, LayerNorm, Linear; per-token cross-entropy with ignored targets."""
    model = seeded(
        lambda: nn.Sequential(
            nn.Embedding(5, 4),
            nn.LayerNorm(4),
            nn.Linear(4, 4),
            nn.Tanh(),
            nn.Linear(4, 5),
            Transpose(),
        )
    )
    return model, nn.CrossEntropyLoss(ignore_index=2), token_data(ignore_index=2)


def kfac_scaled():
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)))
    return model, nn.CrossEntropyLoss(), class_data((4,), 3, sizes=(6, 5))


def kfac_weighted():
    model, loss_fn, data = kfac_mlp("mse")
    g = torch.Generator().manual_seed(7)
    return model, loss_fn, [(X, y, 2 * torch.rand(X.shape[0], generator=g)) for X, y in data]


def kfac_wide():
    """A factor large enough for the CPU's symmetric rank-k update (``linalg.gram``)."""
    model = seeded(lambda: nn.Linear(64, 3))
    return model, nn.CrossEntropyLoss(), class_data((64,), 3, sizes=(300, 260))


KFAC_CASES = {
    "mlp-type2": (kfac_mlp, {}),
    "mlp-empirical": (kfac_mlp, {"fisher": "empirical"}),
    "mlp-forward_only": (kfac_mlp, {"fisher": "forward_only"}),
    "mlp-mse-separate_bias": (lambda: kfac_mlp("mse"), {"separate_bias": True}),
    "sequence-expand": (kfac_sequence, {"approx": "expand"}),
    "sequence-reduce": (kfac_sequence, {"approx": "reduce"}),
    "conv-type2": (kfac_conv, {}),
    "conv-reduce-empirical": (kfac_conv, {"approx": "reduce", "fisher": "empirical"}),
    "tokens-type2": (kfac_tokens, {}),
    "other-diagonal": (kfac_scaled, {"other": "diagonal"}),
    "other-dense": (kfac_scaled, {"other": "dense"}),
    "lm-other-diagonal": (lm_problem, {"other": "diagonal", "fisher": "empirical"}),
    "weighted": (kfac_weighted, {}),
    "wide-input": (kfac_wide, {}),
}


def check_structured(K_cpu, K_dev, device, dtype=torch.float64, *, ekfac=False):
    """Products, inverses, trace, logdet, norm, diagonal, eigendecomposition agree."""
    check_products(K_cpu, K_dev, device, dtype)
    V = tangents((K_cpu.shape[1], 3), 8, dtype)
    Vd = V.to(device)
    close(K_dev.diagonal(), K_cpu.diagonal(), device, dtype)
    for name in ("trace", "frobenius_norm"):
        close(getattr(K_dev, name)(), getattr(K_cpu, name)(), device, dtype)
    close(K_dev.logdet(DAMPING), K_cpu.logdet(DAMPING), device, dtype)
    inverses = [{}] if ekfac else [{}, {"heuristic": "pi"}, {"exact": True}]
    for options in inverses:
        close(
            K_dev.inverse(DAMPING, **options) @ Vd,
            K_cpu.inverse(DAMPING, **options) @ V,
            device,
            dtype,
        )
    lam_d, Q_d = K_dev.eigh()
    lam_c, _ = K_cpu.eigh()
    close(lam_d.sort().values, lam_c.sort().values, device, dtype)
    # Q diag(λ) Qᵀ on the device is the operator (eigenvectors differ in sign between devices).
    close(Q_d @ (lam_d[:, None] * (Q_d.T @ Vd)), K_cpu @ V, device, dtype)


def kfac_twins(case, device, cls=KFAC, dtype=torch.float64, **extra):
    build, options = KFAC_CASES[case] if isinstance(case, str) else case
    (m_c, l_c, d_c), (m_d, l_d, d_d) = twins(*build(), device, dtype)
    options = {**options, **extra}
    K_cpu, K_dev = cls(m_c, l_c, d_c, **options), cls(m_d, l_d, d_d, **options)
    fresh = (
        cls(m_c, l_c, d_c, compute=False, **options),
        cls(m_d, l_d, d_d, compute=False, **options),
    )
    return K_cpu, K_dev, fresh


def check_state_transfer(K_cpu, K_dev, fresh, device, dtype=torch.float64):
    """Factors saved on one device load into the same operator built on the other."""
    state = K_dev.state_dict()
    for f in state["factors"].values():
        assert all(t.device.type == device.type for t in f.values())
    on_cpu, on_dev = fresh
    on_cpu.load_state_dict(state)
    on_dev.load_state_dict(K_cpu.state_dict())
    assert all(t.device.type == "cpu" for f in on_cpu.factors.values() for t in f.values())
    assert all(t.device.type == device.type for f in on_dev.factors.values() for t in f.values())
    V = tangents((K_cpu.shape[1], 2), 9, dtype)
    close(K_dev @ V.to(device), on_cpu @ V, device, dtype)
    close(on_dev @ V.to(device), K_cpu @ V, device, dtype)


@pytest.mark.parametrize("case", list(KFAC_CASES))
def test_kfac_matches_cpu(case, device):
    # type-2 over several positions warns where it reaches per-example (norm-layer) blocks
    warns = (pytest.warns(UserWarning, match="fisher='type2' backpropagates")
             if case == "tokens-type2" else contextlib.nullcontext())
    with warns:
        K_cpu, K_dev, fresh = kfac_twins(case, device)
    check_structured(K_cpu, K_dev, device)
    for path, f in K_cpu.factors.items():
        for role, t in f.items():
            close(K_dev.factors[path][role], t, device)
    check_state_transfer(K_cpu, K_dev, fresh, device)


def test_kfac_weights_on_cpu_with_data_on_device(device):
    """Example weights are moved to the model's device (they need not be there already)."""
    model, loss_fn, data = kfac_weighted()
    (m_c, l_c, d_c), (m_d, l_d, d_d) = twins(model, loss_fn, data, device)
    d_d = [(X, y, w.cpu()) for X, y, w in d_d]
    check_products(KFAC(m_c, l_c, d_c), KFAC(m_d, l_d, d_d), device)


def count_syncs(fn) -> list[str]:
    """Where ``fn()`` synchronised the CUDA device with the host (file:line of each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("op", [GGN, FisherMC])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_output_space_products_read_the_device_once(op, loss, device):
    """The GGN and the MC Fisher never index with the targets: their checks and the term
    count of all batches are read in one synchronisation per product."""
    if device.type != "cuda":
        pytest.skip("counts CUDA synchronisations (torch.cuda.set_sync_debug_mode)")
    _, (model, loss_fn, data) = twins(*kfac_mlp(loss), device)
    A = op(model, loss_fn, data)
    V = torch.randn(A.shape[1], 2, dtype=torch.float64, device=device)
    for product in (lambda: A @ V, lambda: A @ V[:, 0]):
        syncs = count_syncs(product)
        assert len(syncs) <= 1, syncs


@pytest.mark.parametrize("build,fisher", [(kfac_mlp, "type2"), (kfac_mlp, "mc"),
                                           (kfac_weighted, "type2")])
def test_kfac_compute_reads_the_device_twice(build, fisher, device):
    """One read for the term count and the deferred target and weight checks of all batches,
    one for the layers' checks; a read per batch or per layer stalls the launch queue."""
    if device.type != "cuda":
        pytest.skip("counts CUDA synchronisations (torch.cuda.set_sync_debug_mode)")
    _, (model, loss_fn, data) = twins(*build(), device)
    op = KFAC(model, loss_fn, data, fisher=fisher)  # the first pass plans the layers
    syncs = count_syncs(op.compute)
    assert len(syncs) <= 2, syncs


@pytest.mark.parametrize("case", ["mlp-type2", "lm-other-diagonal"])
def test_kfac_float32_matches_cpu(case, device):
    K_cpu, K_dev, fresh = kfac_twins(case, device, dtype=torch.float32)
    check_products(K_cpu, K_dev, device, torch.float32)
    check_state_transfer(K_cpu, K_dev, fresh, device, torch.float32)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("case", ["mlp-type2", "tokens-type2"])
def test_monte_carlo_kfac_on_device(case, cls, device):
    """MC draws differ between devices: check the device run, then transfer it exactly."""
    K_cpu, K_dev, fresh = kfac_twins(case, device, cls, fisher="mc", mc_samples=2)
    V = tangents((K_dev.shape[1], 3), 10).to(device)
    first = K_dev @ V
    assert first.device.type == device.type and first.isfinite().all()
    close(K_dev.compute() @ V, first.cpu(), device)  # the same seed: the same draw
    lam, _ = K_dev.eigh()
    assert lam.device.type == device.type and (lam >= -1e-12 * lam.abs().max()).all()
    check_state_transfer(K_cpu, K_dev, fresh, device)


def test_monte_carlo_kfac_approaches_type2_on_device(device):
    build, _ = KFAC_CASES["mlp-type2"]
    _, (m, lf, d) = twins(*build(), device)
    T2 = KFAC(m, lf, d).to_dense()
    MC = KFAC(m, lf, d, fisher="mc", mc_samples=300, seed=1).to_dense()
    error = ((MC - T2).norm() / T2.norm()).item()
    assert error < 0.15, error


EKFAC_CASES = {
    "mlp-type2": (kfac_mlp, {}),
    "mlp-empirical-separate_bias": (kfac_mlp, {"fisher": "empirical", "separate_bias": True}),
    "conv-empirical": (kfac_conv, {"fisher": "empirical"}),
    "tokens-empirical": (kfac_tokens, {"fisher": "empirical"}),
    "other-dense": (kfac_scaled, {"other": "dense"}),
}


@pytest.mark.parametrize("case", list(EKFAC_CASES))
def test_ekfac_matches_cpu(case, device):
    K_cpu, K_dev, fresh = kfac_twins(EKFAC_CASES[case], device, EKFAC)
    check_structured(K_cpu, K_dev, device, ekfac=True)
    check_state_transfer(K_cpu, K_dev, fresh, device)


def test_ekfac_type2_over_positions_warns_on_device(device):
    with pytest.warns(UserWarning, match="fisher='type2' backpropagates"):
        K_cpu, K_dev, fresh = kfac_twins(KFAC_CASES["tokens-type2"], device, EKFAC)
    check_structured(K_cpu, K_dev, device, ekfac=True)


def test_ekfac_float32_matches_cpu(device):
    K_cpu, K_dev, _ = kfac_twins(EKFAC_CASES["mlp-type2"], device, EKFAC, dtype=torch.float32)
    check_products(K_cpu, K_dev, device, torch.float32)
    V = tangents((K_cpu.shape[1], 2), 11, torch.float32)
    close(K_dev.inverse(0.1) @ V.to(device), K_cpu.inverse(0.1) @ V, device, torch.float32)


# --------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize(
    "groups",
    [
        ("perm", "identity"),
        ("sign", "sign"),
        ("signed_perm", "identity"),
        ("orthogonal", "identity"),
        ("identity", "perm"),
    ],
)
def test_symmetry_averaged_matches_cpu(groups, device):
    G = tangents((6, 5, 3), 12)
    S_cpu = SymmetryAveraged.from_samples(G, groups=groups)
    S_dev = SymmetryAveraged.from_samples(G.to(device), groups=groups)
    check_products(S_cpu, S_dev, device)
    V = tangents((15, 2), 13)
    for get in (lambda S: S.inverse(0.1), lambda S: S.pow(-0.5, damping=0.1)):
        close(get(S_dev) @ V.to(device), get(S_cpu) @ V, device)
    close(S_dev.trace(), S_cpu.trace(), device)
    close(S_dev.label_multiplicities(), S_cpu.label_multiplicities(), device)
    close(S_cpu.to(device) @ V.to(device), S_cpu @ V, device)  # a moved operator, the same
    M = tangents((15, 15), 14)
    M = M @ M.T
    close(
        SymmetryAveraged.from_matrix(M.to(device), shape=(5, 3), groups=groups).to_dense(),
        SymmetryAveraged.from_matrix(M, shape=(5, 3), groups=groups).to_dense(),
        device,
    )


def test_symmetry_block_diagonal_of_an_mlp_matches_cpu(device):
    torch.manual_seed(0)
    model = mlp()
    names = sequential_symmetries(model)
    samples = [tangents((4, *p.shape), i) for i, (_, p) in enumerate(model.named_parameters())]
    groups = list(names.values())
    B_cpu = symmetry_block_diagonal(samples, groups=groups)
    B_dev = symmetry_block_diagonal([s.to(device) for s in samples], groups=groups)
    check_products(B_cpu, B_dev, device)
    V = tangents((B_cpu.shape[1], 2), 15)
    close(B_dev.inverse(0.1) @ V.to(device), B_cpu.inverse(0.1) @ V, device)


# --------------------------------------------------------------------------- mixed devices
@pytest.fixture
def other(other_device):
    return other_device


@pytest.fixture
def accelerator(device):
    if device.type == "cpu":
        pytest.skip("needs a device other than the CPU that computes")
    return device


def mixed(problem, *, model_on, data_on):
    """A problem with the model (and loss) on one device and the data on another."""
    model, loss_fn, data = problem
    return model.to(model_on), loss_fn.to(model_on), move(data, data_on)


MIXED_OPERATORS = {
    **{k: EXACT_OPERATORS[k] for k in ("ggn", "hessian", "ef")},
    "fisher_mc": lambda m, lf, d: FisherMC(m, lf, d),
    "jacobian": lambda m, lf, d: Jacobian(m, d),
    "kfac": lambda m, lf, d: KFAC(m, lf, d),
    "kfac-unchecked": lambda m, lf, d: KFAC(m, lf, d, check_deterministic=False),
    "ekfac": lambda m, lf, d: EKFAC(m, lf, d),
}


@pytest.mark.parametrize(
    "model_on_device", [True, False], ids=["model-on-device", "data-on-device"]
)
@pytest.mark.parametrize("op", list(MIXED_OPERATORS))
def test_model_and_data_on_different_devices_is_a_clear_error(op, model_on_device, other):
    model_on, data_on = (other, CPU) if model_on_device else (CPU, other)
    if op == "kfac-unchecked" and model_on.type == "meta":
        pytest.skip("KFAC makes its sampling generator first, which meta tensors cannot have")
    m, lf, d = mixed(exact_problem("mlp-mse"), model_on=model_on, data_on=data_on)
    with pytest.raises(
        TypeError, match=rf"batch 0 has inputs on {data_on.type}.*parameters are on {model_on.type}"
    ):
        MIXED_OPERATORS[op](m, lf, d)


@pytest.mark.parametrize(
    "model_on_device", [True, False], ids=["model-on-device", "data-on-device"]
)
def test_integer_inputs_on_another_device_is_a_clear_error(model_on_device, other):
    model_on, data_on = (other, CPU) if model_on_device else (CPU, other)
    m, lf, d = mixed(lm_problem(), model_on=model_on, data_on=data_on)
    with pytest.raises(TypeError, match=rf"inputs on {data_on.type}.*parameters are on"):
        GGN(m, lf, d)


@pytest.mark.parametrize("op", ["ggn", "hessian", "kfac-empirical"])
def test_targets_on_another_device_is_a_clear_error(op, other):
    model, loss_fn, data = exact_problem("mlp-ce-weighted" if op == "ggn" else "mlp-mse")
    model, loss_fn = model.to(other), loss_fn.to(other)
    data = [(X.to(other), y) for X, y in data]  # targets stay on the CPU
    build = {
        "ggn": lambda: GGN(model, loss_fn, data),
        "hessian": lambda: Hessian(model, loss_fn, data),
        "kfac-empirical": lambda: KFAC(model, loss_fn, data, fisher="empirical"),
    }[op]
    with pytest.raises(TypeError, match=rf"batch 0 has targets on cpu.*on {other.type}"):
        build()


def test_loss_weights_on_another_device_is_a_clear_error(other):
    model, loss_fn, data = exact_problem("mlp-ce-weighted")
    with pytest.raises(TypeError, match=rf"loss's 'weight' is on cpu.*on {other.type}"):
        GGN(model.to(other), loss_fn, move(data, other))


@pytest.mark.parametrize("op", ["ggn", "kfac"])
def test_operand_on_another_device_is_a_clear_error(op, accelerator):
    _, (m, lf, d) = twins(*exact_problem("mlp-mse"), accelerator)
    A = GGN(m, lf, d) if op == "ggn" else KFAC(m, lf, d)
    with pytest.raises(ValueError, match=f"expected operand on device {accelerator.type}"):
        A @ torch.ones(A.shape[1])


@pytest.mark.parametrize("op", ["ggn", "jacobian", "kfac", "ekfac"])
def test_operators_refuse_to_move(op, device):
    _, (m, lf, d) = twins(*exact_problem("mlp-mse"), device)
    A = MIXED_OPERATORS[op](m, lf, d)
    with pytest.raises(NotImplementedError, match="cannot be moved"):
        A.to("cpu")
