"""Damped Gauss–Newton steps by conjugate gradients on the GGN, never forming the matrix.

The GGN is positive semi-definite, so CG applies; for the (indefinite) Hessian use
``curvkit.linalg.minres`` or enough damping.

Run: python examples/newton_cg_step.py
"""

import torch
from torch import nn

from curvkit.curvature import GGN
from curvkit.linalg import cg


def main() -> None:
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = torch.sin(X @ torch.randn(8, 2, generator=g))
    data = [(X[:128], y[:128]), (X[128:], y[128:])]  # the operator covers all batches
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    loss_fn = nn.MSELoss()
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return loss_fn(model(X), y)

    for step in range(5):
        grad = torch.autograd.grad(loss(), params)
        G = GGN(model, loss_fn, data)
        # (G + λI) d = -g, solved matrix-free; lists of tensors shaped like the parameters work.
        result = cg(
            G,
            [-gi for gi in grad],
            damping=1e-2,
            rtol=1e-6,
            max_iter=200,
            on_failure="warn",
            return_info=True,
        )
        with torch.no_grad():
            for p, d in zip(params, result.x):
                p += d
        print(f"step {step}: loss {loss().item():.3e} after {result.iterations} CG iterations")


if __name__ == "__main__":
    main()
