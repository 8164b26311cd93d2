"""Spectral-factorized curvature learning against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from curvkit.optim.spectral import (
    SpectralShampoo,
    inverse_root,
    kl_apply,
    kl_kronecker_step,
    kl_targets,
    newton_schulz_polar,
    spectral_init,
    spectral_step,
)


def random_orthogonal(n, g):
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g))
    return Q * torch.sign(torch.diagonal(R))


def spd_with_spectrum(spectrum, g):
    Q = random_orthogonal(len(spectrum), g)
    return Q @ torch.diag(torch.as_tensor(spectrum)) @ Q.T


def orth_error(B):
    B = B.double()
    return float((B.T @ B - torch.eye(B.shape[0])).abs().max())


# --------------------------------------------------------------------------- kernels
def test_step_is_the_ema_to_first_order():
    g = torch.Generator().manual_seed(0)
    n = 6
    B = random_orthogonal(n, g)
    d = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    S = B @ torch.diag(d) @ B.T
    X = torch.randn(n, 3, generator=g)
    C = X @ X.T
    errors = []
    for beta in (1e-2, 1e-3):
        B1, d1 = spectral_step(B, d, B.T @ C @ B, beta=beta, kappa=0.0, max_log_step=10.0,
                               max_rotation=10.0)
        ema = (1 - beta) * S + beta * C
        errors.append(float(torch.linalg.matrix_norm(B1 @ torch.diag(d1) @ B1.T - ema)
                            / torch.linalg.matrix_norm(ema)))
        assert orth_error(B1) < 1e-12
    ratio = errors[0] / errors[1]
    assert 70 < ratio < 130  # O(β²): 10x smaller step, ~100x smaller error


@pytest.mark.parametrize("retraction", ["exp", "cayley", "taylor"])
def test_converges_to_a_fixed_spd_targets_eigendecomposition(retraction):
    g = torch.Generator().manual_seed(1)
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    Sigma = spd_with_spectrum(spectrum, g)
    B, d = random_orthogonal(5, g), torch.linspace(1.0, 2.0, 5)  # generic start, no eigh
    for step in range(700):
        B, d = spectral_step(B, d, B.T @ Sigma @ B, beta=0.05, kappa=1e-3,
                             retraction=retraction)
        if retraction == "taylor" and step % 20 == 19:
            B = newton_schulz_polar(B)
    torch.testing.assert_close(d.sort(descending=True).values, spectrum, rtol=1e-6, atol=1e-8)
    V = torch.linalg.eigh(Sigma).eigenvectors
    overlap = (B.T @ V).abs()  # a permutation matrix
    torch.testing.assert_close(overlap.max(1).values, torch.ones(5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(B @ torch.diag(d) @ B.T, Sigma, rtol=1e-6, atol=1e-6)


def test_stationary_stochastic_target_within_sampling_error():
    g = torch.Generator().manual_seed(2)
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.25])
    Sigma = spd_with_spectrum(spectrum, g)
    L = torch.linalg.cholesky(Sigma)
    X = torch.randn(20, 4, generator=g) @ L.T
    B, d = spectral_init(X.T @ X / 20, eps=1e-6)
    Ds = []
    xs = torch.randn(1500, 4, generator=g) @ L.T
    for t, x in enumerate(xs):
        y = B.T @ x
        B, d = spectral_step(B, d, torch.outer(y, y), beta=0.02, kappa=1e-3)
        if t >= 500:
            Ds.append(d.sort(descending=True).values)
    mean_d = torch.stack(Ds).mean(0)
    torch.testing.assert_close(mean_d, spectrum, rtol=0.15, atol=0.0)


def test_positivity_and_robustness():
    g = torch.Generator().manual_seed(3)
    B, d = random_orthogonal(4, g), torch.tensor([3.0, 2.0, 1.0, 0.5])
    for C in (torch.zeros(4, 4), 1e12 * torch.outer(torch.ones(4), torch.ones(4))):
        B1, d1 = B, d
        for _ in range(50):
            B1, d1 = spectral_step(B1, d1, B1.T @ C @ B1, beta=0.05, kappa=1e-3)
        assert torch.isfinite(d1).all() and (d1 > 0).all()
        assert orth_error(B1) < 1e-12


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_inverse_root_matches_eigh_root(p):
    g = torch.Generator().manual_seed(4)
    B, d = random_orthogonal(5, g), torch.rand(5, generator=g) + 0.1
    S = B @ torch.diag(d) @ B.T
    lam, V = torch.linalg.eigh(S + 0.01 * torch.eye(5))
    dense = V @ torch.diag(lam.pow(-1 / p)) @ V.T
    v = torch.randn(5, 2, generator=g)
    torch.testing.assert_close(inverse_root(B, d, v, p=p, eps=0.01), dense @ v)
    torch.testing.assert_close(inverse_root(B, d, v[:, 0], p=p, eps=0.01), dense @ v[:, 0])


def test_equivariance_under_rotation_of_the_statistic():
    g = torch.Generator().manual_seed(5)
    U = random_orthogonal(4, g)
    B, d = random_orthogonal(4, g), torch.tensor([4.0, 3.0, 2.0, 1.0])
    C = spd_with_spectrum([5.0, 1.0, 0.5, 0.1], g)
    B1, d1 = spectral_step(B, d, B.T @ C @ B, beta=0.05, kappa=1e-3)
    UB = U @ B
    B2, d2 = spectral_step(UB, d, UB.T @ (U @ C @ U.T) @ UB, beta=0.05, kappa=1e-3)
    torch.testing.assert_close(d2, d1)
    torch.testing.assert_close(B2, U @ B1)


def test_kronecker_matrix_normal_recovery_and_determinant_constraint():
    g = torch.Generator().manual_seed(6)
    A = spd_with_spectrum([3.0, 1.0, 0.3], g)
    Bm = spd_with_spectrum([2.0, 1.0, 0.5, 0.25], g)
    La, Lb = torch.linalg.cholesky(A), torch.linalg.cholesky(Bm)
    Ba, da, Bb, db = torch.eye(3), torch.tensor([1.5, 1.0, 1 / 1.5]), torch.eye(4), \
        torch.tensor([2.0, 1.0, 1.0, 0.5])
    log_c = torch.tensor(0.0)
    running = torch.zeros(12, 12)
    Gs = La @ torch.randn(900, 3, 4, generator=g) @ Lb.T  # matrix-normal gradients
    for t, G in enumerate(Gs):
        Ba, da, Bb, db, log_c = kl_kronecker_step(Ba, da, Bb, db, log_c, G, beta=0.05,
                                                  kappa=1e-3)
        if t >= 300:
            Sa, Sb = Ba @ torch.diag(da) @ Ba.T, Bb @ torch.diag(db) @ Bb.T
            running += log_c.exp() * torch.kron(Sa, Sb) / 600
        assert abs(float(da.log().sum())) < 1e-10 and abs(float(db.log().sum())) < 1e-10
    target = torch.kron(A, Bm)
    rel = torch.linalg.matrix_norm(running - target) / torch.linalg.matrix_norm(target)
    assert rel < 0.1


# --------------------------------------------------------------------------- optimizer
def _dense_factor(B, d):
    B, d = B.double(), d.double()
    return B @ torch.diag(d) @ B.T


@pytest.mark.parametrize(("target", "root"), [("kl", None), ("kl", 4.0), ("shampoo", None),
                                              ("shampoo", 1.0)])
def test_update_is_dense_inverse_root_of_learned_factors(target, root):
    g = torch.Generator().manual_seed(7)
    W = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    opt = SpectralShampoo([W], lr=1.0, betas=(0.0, 0.999), eps=1e-3, target=target, root=root)
    for _ in range(4):
        before = W.detach().clone()
        G = torch.randn(4, 3, generator=g)
        W.grad = G.clone()
        opt.step()
        block = opt.state[W]["blocks"][0]
        Sa, Sb = _dense_factor(block["B0"], block["d0"]), _dense_factor(block["B1"], block["d1"])
        p = root or (2.0 if target == "kl" else 4.0)
        if target == "kl":
            S = block["log_c"].exp() * torch.kron(Sa, Sb)
            lam, V = torch.linalg.eigh(S)
            step = V @ torch.diag((lam + 1e-3).pow(-1 / p)) @ V.T @ G.flatten()
        else:
            roots = []
            for F in (Sa, Sb):
                lam, V = torch.linalg.eigh(F)
                roots.append(V @ torch.diag((lam + 1e-3).pow(-1 / p)) @ V.T)
            step = (roots[0] @ G @ roots[1]).flatten()
        torch.testing.assert_close((before - W.detach()).flatten(), step, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_basis_stays_orthogonal_for_1000_steps_in_float32(state_dtype):
    g = torch.Generator().manual_seed(8)
    W = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float32))
    opt = SpectralShampoo([W], lr=1e-3, state_dtype=state_dtype)
    for _ in range(1000):
        W.grad = torch.randn(4, 3, generator=g, dtype=torch.float32)
        opt.step()
    block = opt.state[W]["blocks"][0]
    for k in (0, 1):
        B = block[f"B{k}"]
        assert B.dtype == (state_dtype or torch.float32)
        if state_dtype is None:
            assert orth_error(B) < 1e-5
        else:  # stored in bf16 (its spacing bounds the stored error); used after polar steps
            assert orth_error(B) < 2e-2
            assert orth_error(newton_schulz_polar(B.float(), steps=2)) < 1e-5
        assert block[f"d{k}"].dtype == torch.float32 and (block[f"d{k}"] > 0).all()


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("target", ["kl", "shampoo"])
def test_state_dict_resume_is_bit_for_bit(state_dtype, target):
    g = torch.Generator().manual_seed(9)
    dtype = torch.float32

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

    model = make()
    X, Y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    model = model.to(dtype)
    X, Y = X.to(dtype), Y.to(dtype)
    opt = SpectralShampoo(model.parameters(), lr=1e-2, state_dtype=state_dtype, target=target,
                          weight_decay=0.01)

    def closure(m):
        loss = torch.nn.functional.mse_loss(m(X), Y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: closure(model))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    twin = make().to(dtype)
    twin.load_state_dict(saved_model)
    twin_opt = SpectralShampoo(twin.parameters(), lr=1e-2, state_dtype=state_dtype,
                               target=target, weight_decay=0.01)
    twin_opt.load_state_dict(saved_opt)
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            o.step(lambda m=m: closure(m))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_external_targets_are_learned():
    """Caller-supplied PSD factors (e.g. KFAC's) replace the gradient statistics."""
    g = torch.Generator().manual_seed(10)
    A = spd_with_spectrum([4.0, 2.0, 1.0], g)
    Gf = spd_with_spectrum([3.0, 1.0], g)
    W = torch.nn.Parameter(torch.zeros(3, 2))
    opt = SpectralShampoo([W], lr=0.0, root=1.0, beta=0.1)
    for _ in range(400):
        W.grad = torch.randn(3, 2, generator=g)
        opt.step(targets={W: (A, Gf)})
    block = opt.state[W]["blocks"][0]
    torch.testing.assert_close(_dense_factor(block["B0"], block["d0"]), A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_dense_factor(block["B1"], block["d1"]), Gf, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"factors of shapes \(\(m, m\), \(n, n\)\)"):
        opt.step(targets={W: (Gf, A)})


def test_validation_messages():
    W = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"SpectralShampoo: beta must be in \(0.0, 1.0\)"):
        SpectralShampoo([W], beta=0.0)
    with pytest.raises(ValueError, match="SpectralShampoo: target must be one of"):
        SpectralShampoo([W], target="adam")
    with pytest.raises(ValueError, match="SpectralShampoo: retraction must be one of"):
        SpectralShampoo([W], retraction="qr")
    with pytest.raises(ValueError, match="SpectralShampoo: kappa must be in"):
        SpectralShampoo([W], kappa=0.0)
    with pytest.raises(TypeError, match="state_dtype"):
        SpectralShampoo([W], state_dtype=torch.int32)


@pytest.mark.parametrize("target", ["kl", "shampoo"])
def test_update_frequency_averages_targets_between_factor_steps(target):
    g = torch.Generator().manual_seed(11)
    W = torch.nn.Parameter(torch.zeros(4, 3))
    opt = SpectralShampoo([W], lr=0.0, target=target, update_frequency=3)
    Gs = [torch.randn(4, 3, generator=g) for _ in range(3)]
    W.grad = Gs[0].clone()
    opt.step()
    block = opt.state[W]["blocks"][0]
    Ba, da, Bb, db = (block[k].clone() for k in ("B0", "d0", "B1", "d1"))
    log_c = block["log_c"].clone() if target == "kl" else None
    for G in Gs[1:]:
        W.grad = G.clone()
        opt.step()
        if G is Gs[1]:
            assert torch.equal(block["B0"], Ba) and torch.equal(block["d0"], da)
    options = dict(beta=0.05, kappa=1e-3)
    if target == "kl":
        parts = [kl_targets(Ba, da, Bb, db, log_c, G) for G in Gs]
        Ca, Cb, w = (sum(p[i] for p in parts) / 3 for i in range(3))
        expected = kl_apply(Ba, da, Bb, db, log_c, Ca, Cb, w, **options)[:4]
    else:
        Ca = sum(Ba.T @ G @ G.T @ Ba for G in Gs) / 3
        Cb = sum(Bb.T @ G.T @ G @ Bb for G in Gs) / 3
        expected = (*spectral_step(Ba, da, Ca, **options), *spectral_step(Bb, db, Cb, **options))
    got = tuple(block[k] for k in ("B0", "d0", "B1", "d1"))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_kl_form_tracks_dense_kl_shampoo_with_exact_roots():
    """Decomposition-free KL-Shampoo: its direction follows KL-Shampoo run with eigh roots."""
    g = torch.Generator().manual_seed(12)
    A = spd_with_spectrum([3.0, 1.0, 0.5, 0.2], g)
    Bm = spd_with_spectrum([2.0, 1.0, 0.3], g)
    La, Lb = torch.linalg.cholesky(A), torch.linalg.cholesky(Bm)
    Gs = La @ torch.randn(400, 4, 3, generator=g) @ Lb.T
    beta = 0.05

    def inv_sqrt(S):
        lam, V = torch.linalg.eigh(S)
        return V @ torch.diag(lam.rsqrt()) @ V.T

    Sa, Sb = torch.eye(4), torch.eye(3)  # dense KL-Shampoo (simultaneous factor updates)
    Ba, da, Bb, db = spectral_init(Gs[0] @ Gs[0].T / 3, eps=1e-2) + \
        spectral_init(Gs[0].T @ Gs[0] / 4, eps=1e-2)
    da, db = da / da.log().mean().exp(), db / db.log().mean().exp()
    log_c = torch.tensor(0.0)
    for G in Gs:
        Sa, Sb = ((1 - beta) * Sa + beta * G @ torch.linalg.solve(Sb, G.T) / 3,
                  (1 - beta) * Sb + beta * G.T @ torch.linalg.solve(Sa, G) / 4)
        Ba, da, Bb, db, log_c = kl_kronecker_step(Ba, da, Bb, db, log_c, G, beta=beta,
                                                  kappa=1e-3)
    cosines = []
    for G in Gs[-20:]:
        dense = inv_sqrt(Sa) @ G @ inv_sqrt(Sb)
        ours = inverse_root(Ba, da, inverse_root(Bb, db, G.T, p=2.0).T, p=2.0)
        cosines.append(torch.nn.functional.cosine_similarity(dense.flatten(), ours.flatten(),
                                                             dim=0))
    assert min(cosines) > 0.99
