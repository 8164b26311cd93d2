"""Natural-gradient steps preconditioned by the damped inverse of KFAC.

Run: python examples/kfac_natural_gradient.py
"""

import torch
from torch import nn

from curvkit.curvature import KFAC


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 20, generator=g)
    y = (X[:, :5].sum(1) > 0).long() + (X[:, 5] > 1).long()
    data = list(zip(X.split(128), y.split(128)))
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())

    for step in range(10):
        loss = loss_fn(model(X), y)
        grad = torch.autograd.grad(loss, params)
        F = KFAC(model, loss_fn, data, fisher="mc", seed=step)  # one forward/backward per batch
        direction = F.inverse(damping=1e-2, heuristic="pi") @ list(grad)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p -= 0.3 * d
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
