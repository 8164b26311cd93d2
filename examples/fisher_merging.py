"""Fisher-weighted merging of two models trained on different halves of a task.

Each parameter of the merge is the Fisher-weighted average of the two models' parameters,
``θ = (F_a θ_a + F_b θ_b) / (F_a + F_b)`` with the diagonals of the empirical Fisher.

Run: python examples/fisher_merging.py
"""

import torch
from torch import nn

from curvkit.curvature import EmpiricalFisher


def train(model, X, y, steps=300):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 6, generator=g)
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).long()
    base = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    halves = [(X[:300], y[:300]), (X[300:], y[300:])]
    models = []
    for Xi, yi in halves:
        m = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
        m.load_state_dict(base.state_dict())  # same start: the task-arithmetic setting
        models.append(train(m, Xi, yi))

    fishers = [
        EmpiricalFisher(m, nn.CrossEntropyLoss(), [half]).diagonal()
        for m, half in zip(models, halves)
    ]
    flat = [torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models]
    eps = 1e-8
    merged_flat = (fishers[0] * flat[0] + fishers[1] * flat[1]) / (fishers[0] + fishers[1] + eps)
    merged, averaged = (
        nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2)) for _ in range(2)
    )
    torch.nn.utils.vector_to_parameters(merged_flat, merged.parameters())
    torch.nn.utils.vector_to_parameters((flat[0] + flat[1]) / 2, averaged.parameters())

    with torch.no_grad():
        for name, m in (
            ("model A", models[0]),
            ("model B", models[1]),
            ("plain average", averaged),
            ("Fisher merge", merged),
        ):
            print(f"{name:>14}: loss on all data {nn.functional.cross_entropy(m(X), y).item():.4f}")


if __name__ == "__main__":
    main()
