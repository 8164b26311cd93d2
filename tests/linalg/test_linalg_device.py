"""Every linalg entry point on an accelerator equals the CPU result (skipped without CUDA)."""

import warnings

import pytest
import torch
from linalg_cases import F64, gen, randn, random_spd

import curvkit.linalg as la

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linalg_on_cuda_matches_cpu(dtype):
    g = gen(0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    M = random_spd(40, g).to(dtype)
    A, B = random_spd(5, g).to(dtype), random_spd(8, g).to(dtype)
    b = randn(40, 3, g=g).to(dtype)
    ops = {
        "dense": la.Dense(M, psd=True),
        "kron": la.Kronecker(A, B, psd=True),
        "sum": la.Dense(M, psd=True)
        + la.Kronecker(A, B, psd=True)
        + la.Identity(40, 0.5, dtype=dtype),
    }
    for name, op in ops.items():
        gpu = op.to("cuda")
        assert gpu.device.type == "cuda", name
        x = b.cuda()
        torch.testing.assert_close((gpu @ x).cpu(), op @ b, **tol)
        # Krylov solves run to round-off in float64: stopped at 1e-5, the devices' round-off
        # can end them an iteration apart, a 1e-5 difference (minres on an H200).
        krylov = dict(rtol=1e-5 if dtype == torch.float32 else 1e-12)
        torch.testing.assert_close(
            la.cg(gpu, x, damping=0.1, **krylov).cpu(), la.cg(op, b, damping=0.1, **krylov), **tol
        )
        torch.testing.assert_close(
            la.minres(gpu, x, **krylov).cpu(), la.minres(op, b, **krylov), **tol
        )
        # Solved to round-off: at the default 1e-6 the devices' round-off can end the
        # iteration one step apart, a 1e-7 difference (seen on an H200).
        stop = dict(atol=1e-6, btol=1e-6) if dtype == torch.float32 else dict(atol=1e-14, btol=1e-14)
        torch.testing.assert_close(la.lsmr(gpu, x, **stop).cpu(), la.lsmr(op, b, **stop), **tol)
        torch.testing.assert_close(
            la.neumann(gpu, x, alpha=0.1, num_terms=5).cpu(),
            la.neumann(op, b, alpha=0.1, num_terms=5),
            **tol,
        )
        # A CPU generator gives the same probes on every device.
        for method in ("hutchinson", "hutch++", "xtrace"):
            torch.testing.assert_close(
                la.trace(gpu, method=method, num_matvecs=12, generator=gen(1)).cpu(),
                la.trace(op, method=method, num_matvecs=12, generator=gen(1)),
                **tol,
            )
        for method in ("hutchinson", "xdiag"):
            torch.testing.assert_close(
                la.diagonal(gpu, method=method, num_matvecs=12, generator=gen(1)).cpu(),
                la.diagonal(op, method=method, num_matvecs=12, generator=gen(1)),
                **tol,
            )
        torch.testing.assert_close(
            la.frobenius_norm(gpu, num_matvecs=4, generator=gen(1)).cpu(),
            la.frobenius_norm(op, num_matvecs=4, generator=gen(1)),
            **tol,
        )
        ev_gpu, _ = la.eigsh(gpu, 3, generator=gen(2), tol=1e-3 if dtype == torch.float32 else None)
        ev_cpu, _ = la.eigsh(op, 3, generator=gen(2), tol=1e-3 if dtype == torch.float32 else None)
        torch.testing.assert_close(ev_gpu.cpu(), ev_cpu, rtol=1e-3, atol=1e-3)
        low = la.nystrom(gpu, 10, generator=gen(3))
        assert low.device.type == "cuda"
        la.nystrom_pcg(gpu, x, rank=10, damping=0.1, rtol=1e-4, generator=gen(3))
        grid, dens = la.spectral_density(gpu, num_probes=2, num_matvecs=10, generator=gen(4))
        assert grid.device.type == "cuda" and torch.isfinite(dens).all()
        res = la.lanczos(gpu, x[:, 0], 5)
        assert res.Q.device.type == "cuda"
        with warnings.catch_warnings():  # only the device handling is under test here
            warnings.simplefilter("ignore", la.ConvergenceWarning)
            theta, _ = la.power_iteration(gpu, generator=gen(5), tol=1e-2, on_failure="warn")
        assert theta.device.type == "cuda"
    with pytest.raises(ValueError, match="expected operand on device cuda"):
        ops["dense"].to("cuda") @ b
    assert F64 is torch.float64
