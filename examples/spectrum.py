"""Top eigenvalues and the spectral density of the GGN of a small classifier.

Run: python examples/spectrum.py [output.png]
"""

import sys

import torch
from torch import nn

from curvkit.curvature import GGN, Hessian
from curvkit.linalg import eigsh, spectral_density


def main(out: str | None = None) -> None:
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 10, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 4))
    data = [(X, y)]
    G = GGN(model, nn.CrossEntropyLoss(), data)
    H = Hessian(model, nn.CrossEntropyLoss(), data)

    evals, evecs = eigsh(G, 5, which="LA", generator=g)
    print(
        "GGN top-5 eigenvalues:", [f"{v:.4f}" for v in evals.sort(descending=True).values.tolist()]
    )
    evals_H, _ = eigsh(H, 3, which="SA", generator=g)
    print(
        "Hessian bottom-3 eigenvalues (negative curvature):", [f"{v:.2e}" for v in evals_H.tolist()]
    )
    grid, density = spectral_density(G, num_probes=4, num_matvecs=40, scale="log", generator=g)
    mass = torch.trapezoid(density, torch.log10(grid + 1e-8 * grid.max()))
    print(f"log-spectral density on {grid.numel()} points integrates to {mass.item():.3f}")
    if out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.semilogx(grid, density)
        plt.xlabel("eigenvalue")
        plt.ylabel("density of log10 λ")
        plt.savefig(out, dpi=100)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
