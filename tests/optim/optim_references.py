"""Hand-written dense float64 reference steps for the optimizer tests.

These keep the Kronecker factors L, R as full matrices (never the P-coordinates the library
stores) and follow the reference implementations' update order step by step.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def sym_eig_desc(A):
    w, V = torch.linalg.eigh(A)
    return w.flip(0), V.flip(1)


def qr_pos(A):
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))


def align_to(Q_old, Q_new):
    """Permute/sign Q_new's columns to match Q_old's (Hungarian assignment)."""
    overlap = (Q_old.T @ Q_new).abs().numpy()
    rows, cols = linear_sum_assignment(-overlap)
    perm = np.empty_like(cols)
    perm[rows] = cols
    Q = Q_new[:, torch.as_tensor(perm)]
    return Q * torch.sign(torch.diagonal(Q_old.T @ Q))


def kron_all(mats):
    out = mats[0].contiguous()  # torch.kron refuses some non-contiguous views
    for M in mats[1:]:
        out = torch.kron(out, M.contiguous())
    return out


def map_second_moment(V, Q_old, Q_new):
    """Diagonal second moment ``V`` (coordinates in the bases ``Q_old``, one per axis) carried
    into the bases ``Q_new``: the diagonal of the dense matrix ``K_old diag(vec V) K_oldᵀ``
    (``K = ⊗ Q_k``, row-major vec) seen in the new basis ``K_new``."""
    K_old, K_new = kron_all(Q_old), kron_all(Q_new)
    C = K_old @ torch.diag(V.flatten()) @ K_old.T
    return torch.diagonal(K_new.T @ C @ K_new).reshape(V.shape)


class DenseSOAP:
    """SOAP on one matrix (m, n), as in the reference: first step initialises only.

    With ``start > 0`` the steps before and at ``start`` are Adam in the identity basis; the
    eigh basis of the factors is taken at the end of step ``start`` and the second moment is
    carried into it by :func:`map_second_moment` (as it is at every refresh with
    ``second_moment="map"``).
    """

    def __init__(self, shape, *, lr, betas, eps, wd, freq, shampoo_beta=None, method="qr",
                 right=True, start=0, second_moment="keep"):
        m, n = shape
        self.right = right
        self.L, self.R = torch.zeros(m, m), torch.zeros(n, n)
        self.M, self.V = torch.zeros(m, n), torch.zeros(m, n)
        self.QL = self.QR = None
        if start > 0:
            self.QL, self.QR = torch.eye(m), torch.eye(n)
        self.lr, self.betas, self.eps, self.wd, self.freq = lr, betas, eps, wd, freq
        self.sb = betas[1] if shampoo_beta is None else shampoo_beta
        self.method, self.t = method, 0
        self.start, self.second_moment, self.s = start, second_moment, 0

    def _update_factors(self, G):
        self.L = self.sb * self.L + (1 - self.sb) * G @ G.T
        self.R = self.sb * self.R + (1 - self.sb) * G.T @ G

    def _eig_bases(self):
        QL, QR = sym_eig_desc(self.L)[1], sym_eig_desc(self.R)[1]
        return QL, (QR if self.right else torch.eye(self.R.shape[0]))

    def step(self, W, G):
        s = self.s  # 0-based step index
        self.s += 1
        if self.QL is None:
            self._update_factors(G)
            self.QL, self.QR = self._eig_bases()
            return W
        self.t += 1
        b1, b2 = self.betas
        Gr = self.QL.T @ G @ self.QR
        self.M = b1 * self.M + (1 - b1) * Gr
        self.V = b2 * self.V + (1 - b2) * Gr**2
        N = self.QL @ (self.M / (self.V.sqrt() + self.eps)) @ self.QR.T
        size = self.lr * (1 - b2**self.t) ** 0.5 / (1 - b1**self.t)
        W = W * (1 - self.lr * self.wd) - size * N
        self._update_factors(G)
        old = [self.QL, self.QR]
        V_old = self.V
        M_param = self.QL @ self.M @ self.QR.T
        if s == self.start:  # a late start: the first (eigh) basis, from the identity
            self.QL, self.QR = self._eig_bases()
            self.M = self.QL.T @ M_param @ self.QR
            self.V = map_second_moment(V_old, old, [self.QL, self.QR])
        elif s > self.start and (s - self.start) % self.freq == 0:
            if self.method == "qr":
                pl = torch.argsort(torch.diagonal(self.QL.T @ self.L @ self.QL), descending=True)
                pr = torch.argsort(torch.diagonal(self.QR.T @ self.R @ self.QR), descending=True)
                self.V = self.V[pl][:, pr]
                self.QL = qr_pos(self.L @ self.QL[:, pl])
                self.QR = qr_pos(self.R @ self.QR[:, pr])
                if not self.right:
                    self.V, self.QR = self.V[:, torch.argsort(pr)], torch.eye(self.R.shape[0])
            else:  # exact eigenbasis, columns kept attached to their predecessors
                self.QL = align_to(self.QL, sym_eig_desc(self.L)[1])
                self.QR = align_to(self.QR, sym_eig_desc(self.R)[1])
            self.M = self.QL.T @ M_param @ self.QR
            if self.second_moment == "map":
                self.V = map_second_moment(V_old, old, [self.QL, self.QR])
        return W


def adam_step(W, G, state, *, lr, betas, eps, wd, bias_correction=True):
    b1, b2 = betas
    state["t"] = state.get("t", 0) + 1
    state["m"] = b1 * state.get("m", torch.zeros_like(G)) + (1 - b1) * G
    state["v"] = b2 * state.get("v", torch.zeros_like(G)) + (1 - b2) * G**2
    c1 = 1 - b1 ** state["t"] if bias_correction else 1.0
    c2 = 1 - b2 ** state["t"] if bias_correction else 1.0
    U = (state["m"] / c1) / ((state["v"] / c2).sqrt() + eps)
    return W * (1 - lr * wd) - lr * U, U


def unfold_gram(G, k):
    Gk = G.movedim(k, 0).reshape(G.shape[k], -1)
    return Gk @ Gk.T


def mode_mul(X, M, k):
    return torch.movedim(torch.tensordot(M, X, dims=([1], [k])), 0, k)


class DenseShampoo:
    """Shampoo on one tensor of any order: full factors, eigh roots, Adam grafting."""

    def __init__(self, shape, *, lr, betas, eps, graft_eps, wd, freq, exponent=None,
                 grafting=True):
        self.S = [torch.zeros(d, d) for d in shape]
        self.roots = None
        self.adam = {}
        self.lr, self.betas, self.eps, self.graft_eps = lr, betas, eps, graft_eps
        self.wd, self.freq, self.t, self.grafting = wd, freq, 0, grafting
        self.exponent = exponent or 1 / (2 * len(shape))

    def step(self, W, G):
        b1, b2 = self.betas
        self.S = [b2 * S + (1 - b2) * unfold_gram(G, k) for k, S in enumerate(self.S)]
        if self.t % self.freq == 0:
            roots = []
            for S in self.S:
                w, V = torch.linalg.eigh(S / (1 - b2 ** (self.t + 1)))
                roots.append(V @ torch.diag((w.clamp_min(0) + self.eps) ** -self.exponent) @ V.T)
            self.roots = roots
        self.t += 1
        _, U_adam = adam_step(W, G, self.adam, lr=self.lr, betas=self.betas, eps=self.graft_eps,
                              wd=0.0)
        U = self.adam["m"]
        for k, root in enumerate(self.roots):
            U = mode_mul(U, root, k)
        if self.grafting:
            U = U * U_adam.norm() / U.norm()
        return W * (1 - self.lr * self.wd) - self.lr * U


class DenseKL:
    """KL-Shampoo / KL-SOAP on one tensor of any order, the prototype's order of operations,
    with full factors S_k, momentum in parameter space and old eigenvalues everywhere."""

    def __init__(self, shape, *, lr, betas, eps, wd, freq, beta=None, init=0.1, soap=False,
                 clamp=True, start=0, second_moment="keep"):
        self.shape, self.n = shape, len(shape)
        self.S = [torch.zeros(d, d) for d in shape]
        self.Q = None
        self.lam = [torch.full((d,), init) for d in shape]
        self.M = torch.zeros(shape)
        self.V = torch.zeros(shape)
        self.lr, self.betas, self.eps, self.wd, self.freq = lr, betas, eps, wd, freq
        self.beta = betas[1] if beta is None else beta
        self.soap, self.clamp, self.t = soap, clamp, 0
        self.start, self.second_moment = start, second_moment

    def _whiten_other(self, G, k, lam):
        for j in range(self.n):
            if j != k:
                root = self.Q[j] @ torch.diag(lam[j] ** -0.5) @ self.Q[j].T
                G = mode_mul(G, root, j)
        return G

    def step(self, W, G):
        b = self.beta
        numel = G.numel()
        s = self.t  # 0-based step index
        if s == 0 and self.start == 0:
            self.S = [(1 - b) * unfold_gram(G, k) * G.shape[k] / numel for k in range(self.n)]
            self.Q = [torch.linalg.eigh(S)[1].flip(1) for S in self.S]
            self.t = 1
            return W
        if self.Q is None:  # a late start: the identity basis until step `start`
            self.Q = [torch.eye(d) for d in self.shape]
        b1, b2 = self.betas
        Gr = G
        for k in range(self.n):
            Gr = mode_mul(Gr, self.Q[k].T, k)
        self.M = b1 * self.M + (1 - b1) * G
        Mr = self.M
        for k in range(self.n):
            Mr = mode_mul(Mr, self.Q[k].T, k)
        if self.soap:
            self.V = b2 * self.V + (1 - b2) * Gr**2
            Ur = Mr / (self.V.sqrt() + self.eps)
        else:
            D = torch.ones(())
            for k in range(self.n):
                shape = [1] * self.n
                shape[k] = -1
                D = D * (self.lam[k] ** -0.5).reshape(shape)
            Ur = Mr / (1 / D + self.eps)
        U = Ur
        for k in range(self.n):
            U = mode_mul(U, self.Q[k], k)
        W = W * (1 - self.lr * self.wd) - self.lr * U
        old = [lam.clone() for lam in self.lam]
        for k in range(self.n):
            if s == 0:  # (late start) the initial factors are plain Gram matrices, λ is kept
                self.S[k] = (1 - b) * unfold_gram(G, k) * G.shape[k] / numel
                continue
            term = unfold_gram(self._whiten_other(G, k, old), k) * G.shape[k] / numel
            self.S[k] = b * self.S[k] + (1 - b) * term
            lam = b * old[k] + (1 - b) * torch.diagonal(self.Q[k].T @ term @ self.Q[k])
            if self.clamp:
                lam = lam.clamp_min(max(10.0, min(float(G.shape[k]), 4000.0)) ** -2)
            self.lam[k] = lam
        Q_old = self.Q
        if s == self.start:  # a late start: eigh basis; λ and Ṽ carried out of the identity
            self.Q = [torch.linalg.eigh(S)[1].flip(1) for S in self.S]
            self.lam = [torch.diagonal(Q.T @ torch.diag(lam) @ Q)
                        for Q, lam in zip(self.Q, self.lam)]
            self.V = map_second_moment(self.V, Q_old, self.Q)
        elif s > self.start and (s - self.start) % self.freq == 0:
            self.Q = [qr_pos(S @ Q) for S, Q in zip(self.S, self.Q)]
            if self.second_moment == "map":
                self.V = map_second_moment(self.V, Q_old, self.Q)
        self.t += 1
        return W


def run_ours(cls, W0, Gs, **options):
    """Optimizer ``cls`` on one parameter starting at ``W0`` fed the gradients ``Gs``.

    Returns:
        ``(iterates, optimizer)``: the parameter after every step, and the optimizer.
    """
    W = torch.nn.Parameter(W0.clone())
    opt = cls([W], **options)
    out = []
    for G in Gs:
        W.grad = G.clone()
        opt.step()
        out.append(W.detach().clone())
    return out, opt


def assert_follows(ours, reference, W0, Gs, **tolerance):
    """``ours`` (iterates) equal the reference's steps from ``W0`` on ``Gs``, step by step."""
    W = W0.clone()
    for G, got in zip(Gs, ours):
        W = reference.step(W, G)
        torch.testing.assert_close(got, W, **tolerance)

