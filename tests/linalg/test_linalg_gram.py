"""``curvkit.linalg.gram``: the symmetric rank-k Gram against ``m.T @ m``."""

import pytest
import torch

from curvkit.linalg import gram as gram_module
from curvkit.linalg.gram import gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(512, 129), (300, 20), (7, 3), (2048, 16)])
def test_gram_equals_the_matmul(dtype, shape):
    m = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    G = gram(m)
    ref = m.T @ m
    assert G.shape == ref.shape and G.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4 * shape[0]) if dtype == torch.float32 else {}
    torch.testing.assert_close(G, ref, **tol)
    torch.testing.assert_close(G, G.T, **tol)


def test_large_cpu_grams_take_the_host_syrk_and_small_ones_do_not(monkeypatch):
    calls = []
    original = gram_module._host_syrk
    monkeypatch.setattr(gram_module, "_host_syrk", lambda m: calls.append(m.shape) or original(m))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gram(torch.randn(512, 129))
        gram(torch.randn(512, 10))  # too narrow: torch's matmul
        gram(torch.randn(64, 64))  # too little work
        gram(torch.randn(128, 1024))  # too few rows: the mirror copy costs more than syrk saves
        torch.set_num_threads(2)  # threads of two pools would compete: torch's matmul
        gram(torch.randn(512, 129))
    finally:
        torch.set_num_threads(previous)
    assert calls == [(512, 129)]


def test_non_contiguous_input_and_no_aliasing():
    base = torch.randn(200, 300)
    m = base[:, ::2]  # (200, 150), strided
    G = gram(m)
    torch.testing.assert_close(G, m.T @ m)
    G.zero_()
    assert base.abs().sum() > 0  # the result owns its memory


def test_autograd_inputs_keep_their_graph():
    m = torch.randn(512, 129, requires_grad=True)
    G = gram(m)
    assert G.requires_grad
    (g,) = torch.autograd.grad(G.sum(), m)
    torch.testing.assert_close(g, 2 * m.detach() @ torch.ones(129, 129))


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_grams_on_every_path(threads):
    # One thread: the host syrk (also from a transposed, column-major view, without a copy);
    # two threads: upper blocks mirrored. Both equal the matmul in float64.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        J = torch.randn(300, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(gram(J), J.T @ J, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(gram(J.T), J @ J.T, rtol=1e-12, atol=1e-10)
        assert torch.equal(gram(J), gram(J).T) or threads == 2
    finally:
        torch.set_num_threads(previous)
