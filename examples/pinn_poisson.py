"""Solve a 2-d Poisson equation with a physics-informed network trained by SPRING.

Run: python examples/pinn_poisson.py
"""

from curvkit.pinn import poisson, train


def main(steps: int = 15) -> None:
    problem = poisson(dim=2)
    history = train(
        problem, method="spring", steps=steps, num_interior=200, num_boundary=40, seed=0
    )
    print(
        f"after {steps} SPRING steps: loss {history.loss[-1]:.3e}, L2 error {history.l2_error[-1]:.3e}"
    )


if __name__ == "__main__":
    main()
