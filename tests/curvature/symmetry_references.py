"""Dense references for the symmetry tests: group elements and brute-force orbit averages."""

from __future__ import annotations

import itertools

import torch


def permutations(h):
    for p in itertools.permutations(range(h)):
        P = torch.zeros(h, h)
        P[torch.arange(h), torch.tensor(p)] = 1.0
        yield P


def sign_flips(h):
    for s in itertools.product([1.0, -1.0], repeat=h):
        yield torch.diag(torch.tensor(s))


def signed_permutations(h):
    return [S @ P for S in sign_flips(h) for P in permutations(h)]


ELEMENTS = {
    "identity": lambda h: [torch.eye(h)],
    "perm": lambda h: list(permutations(h)),
    "sign": lambda h: list(sign_flips(h)),
    "signed_perm": signed_permutations,
}


def brute_force(M, shape, groups):
    """``mean_{A} (A_1 ⊗ A_2) M (A_1 ⊗ A_2)ᵀ`` over every element of a finite product group."""
    mats = [ELEMENTS[g](h) for g, h in zip(groups, shape)]
    total, count = torch.zeros_like(M), 0
    for combo in itertools.product(*mats):
        A = combo[0]
        for B in combo[1:]:
            A = torch.kron(A, B)
        total += A @ M @ A.T
        count += 1
    return total / count
