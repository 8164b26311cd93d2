"""Approximation quality of symmetry-averaged curvature against the exact GGN.

For a ReLU MLP and a small Transformer (cross-entropy), the exact GGN ``A`` (dense, float64) is
compared with block-diagonal estimates ``Â``: each parameter block's GGN projected onto the
commutant of a named symmetry group (its exact orbit average), KFAC (type-2) and the exact
diagonal. Reported per estimate: the relative error ``‖(Â - A) V‖_F / ‖A V‖_F`` on random
Gaussian directions ``V`` and on the top-``k`` eigenvectors of ``A``, the number of stored
floats (memory), and build times. The symmetry estimates here are *oracle* projections of the
exact GGN blocks (the best estimate each structure allows in Frobenius norm); their build time is
the projection only, so only the dense GGN's build is given as a ratio to KFAC's.

Usage::

    python benchmarks/symmetry.py            # default sizes
    python benchmarks/symmetry.py --quick    # smoke test

Writes ``benchmarks/results/symmetry.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from curvkit.curvature import GGN
from curvkit.curvature.symmetry import SymmetryAveraged
from curvkit.linalg.structured import BlockDiagonal, Dense, Diagonal

try:
    from curvkit.curvature.kfac import KFAC
except ImportError:  # KFAC lands separately; the table then says so
    KFAC = None

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- models
def make_mlp(widths, generator):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    / math.sqrt(p.shape[-1]))
    return model


class TinyTransformer(nn.Module):
    """One pre-norm block: single-head causal attention and a ReLU MLP; tokens in, logits out.

    No positional parameter (KFAC covers embeddings, linears and norms only).
    """

    def __init__(self, vocab: int, dim: int, hidden: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.ones(seq, seq).tril().bool())

    def forward(self, tokens):
        x = self.embed(tokens)  # no positional embedding: the causal mask breaks the symmetry
        h = self.ln1(x)
        scores = self.q(h) @ self.k(h).mT / math.sqrt(h.shape[-1])
        T = tokens.shape[1]
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        x = x + self.o(scores.softmax(-1) @ self.v(h))
        x = x + self.down(torch.relu(self.up(self.ln2(x))))
        return self.head(x).flatten(0, 1)  # (N·T, vocab)


# --------------------------------------------------------------------------- group catalogues
def mlp_groups(model):
    """Per parameter: which axes index hidden units (permutable) and which are data/outputs."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    out = {}
    for i, layer in enumerate(linears):
        rows_hidden = i < len(linears) - 1
        cols_hidden = i > 0
        out[id(layer.weight)] = (rows_hidden, cols_hidden)
        out[id(layer.bias)] = (rows_hidden,)
    return out


def transformer_groups(model):
    """MLP hidden units are permutable (rows of ``up``, columns of ``down``); nothing else."""
    hidden = {id(p): (False,) * p.dim() for p in model.parameters()}
    hidden[id(model.up.weight)] = (True, False)
    hidden[id(model.up.bias)] = (True,)
    hidden[id(model.down.weight)] = (False, True)
    return hidden


def catalogue(shape, hidden):
    """Named group choices for one parameter (``None``: that choice does not apply)."""
    vec = len(shape) == 1
    big = 0 if vec or shape[0] >= shape[1] else 1
    orth_one = ("orthogonal",) if vec else tuple("orthogonal" if a == big else "identity"
                                                 for a in range(2))
    return {
        "block (identity)": ("identity",) * len(shape),
        "perm (hidden units)": tuple("perm" if h else "identity" for h in hidden),
        "sign (rows)": ("sign",) if vec else ("sign", "identity"),
        "orthogonal, one side (Shampoo/Muon)": orth_one,
        "orthogonal, both sides": ("orthogonal",) * len(shape),
    }


# --------------------------------------------------------------------------- estimates
def ggn_blocks(A, params):
    blocks, start = [], 0
    for p in params:
        n = p.numel()
        blocks.append(A[start:start + n, start:start + n])
        start += n
    return blocks


def symmetric_estimate(blocks, params, hidden, name):
    ops, stored = [], 0
    for B, p in zip(blocks, params):
        shape = tuple(p.shape) if p.dim() <= 2 else (p.shape[0], p[0].numel())
        groups = catalogue(shape, hidden[id(p)])[name]
        op = SymmetryAveraged.from_matrix(B, shape=shape, groups=groups)
        ops.append(op)
        stored += op.num_stored
    return BlockDiagonal(ops), stored


def relative_errors(est, A, V_rand, V_top):
    out = {}
    for key, V in (("random", V_rand), ("top", V_top)):
        AV = A @ V
        out[key] = float(torch.linalg.matrix_norm(est @ V - AV) / torch.linalg.matrix_norm(AV))
    return out


def kfac_stored(op):
    total = 0
    for factors in op.factors.values():
        for t in factors.values():
            if isinstance(t, torch.Tensor):
                square = t.dim() == 2 and t.shape[0] == t.shape[1]
                total += t.shape[0] * (t.shape[0] + 1) // 2 if square else t.numel()
    return total


def run_problem(name, model, loss_fn, data, hidden, *, top_k, num_random, repeats, generator):
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    A = GGN(model, loss_fn, data).to_dense()
    ggn_time = time.perf_counter() - t0
    A = 0.5 * (A + A.T)
    lam, Q = torch.linalg.eigh(A)
    V_top = Q[:, -top_k:]
    V_rand = torch.randn(P, num_random, generator=generator, dtype=A.dtype)
    blocks = ggn_blocks(A, params)
    rows = []

    def timed(build):
        times, result = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            result = build()
            times.append(time.perf_counter() - t)
        return result, sorted(times)[len(times) // 2]

    kfac_time = None
    if KFAC is not None:
        (op, stored), kfac_time = timed(lambda: ((k := KFAC(model, loss_fn, data)), kfac_stored(k)))
        rows.append(dict(problem=name, estimate="KFAC (type-2)", stored=stored,
                         build_s=kfac_time, **relative_errors(op, A, V_rand, V_top)))
    diag = torch.diagonal(A).clone()
    rows.append(dict(problem=name, estimate="diagonal (exact)", stored=P, build_s=None,
                     **relative_errors(Diagonal(diag), A, V_rand, V_top)))
    choices = catalogue((2, 2), (True, True)).keys()
    for choice in choices:
        (op, stored), t = timed(lambda c=choice: symmetric_estimate(blocks, params, hidden, c))
        rows.append(dict(problem=name, estimate=f"symmetry: {choice}", stored=stored, build_s=t,
                         **relative_errors(op, A, V_rand, V_top)))
    rows.append(dict(problem=name, estimate="exact GGN (dense)", stored=P * (P + 1) // 2,
                     build_s=ggn_time, **relative_errors(Dense(A), A, V_rand, V_top)))
    for r in rows:  # projections are timed from the dense blocks: no like-for-like ratio
        r["params"] = P
        like_for_like = r["estimate"] in ("KFAC (type-2)", "exact GGN (dense)")
        r["build_ratio_vs_kfac"] = (r["build_s"] / kfac_time if kfac_time and like_for_like
                                    else None)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--mlp", type=int, nargs="+", default=[10, 24, 24, 5],
                        help="MLP widths (input, hidden..., classes)")
    parser.add_argument("--samples", type=int, default=256, help="MLP data points")
    parser.add_argument("--vocab", type=int, default=12)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--num-random", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.mlp, args.samples, args.sequences, args.repeats = [6, 8, 8, 3], 32, 4, 1
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(args.seed)

    mlp = make_mlp(args.mlp, g)
    X = torch.randn(args.samples, args.mlp[0], generator=g)
    y = torch.randint(args.mlp[-1], (args.samples,), generator=g)
    rows = run_problem("MLP", mlp, nn.CrossEntropyLoss(), [(X, y)], mlp_groups(mlp),
                       top_k=args.top_k, num_random=args.num_random, repeats=args.repeats,
                       generator=g)

    torch.manual_seed(args.seed)  # nn.Module init only
    tf = TinyTransformer(args.vocab, args.dim, args.hidden, args.seq).double()
    tokens = torch.randint(args.vocab, (args.sequences, args.seq + 1), generator=g)
    data = [(tokens[:, :-1], tokens[:, 1:].flatten())]
    rows += run_problem("Transformer", tf, nn.CrossEntropyLoss(), data, transformer_groups(tf),
                        top_k=args.top_k, num_random=args.num_random, repeats=args.repeats,
                        generator=g)

    header = f"{'problem':12} {'estimate':40} {'stored':>8} {'rel.err rand':>12} " \
             f"{'rel.err top':>12} {'build/KFAC':>10}"
    print(header)
    for r in rows:
        ratio = "" if r["build_ratio_vs_kfac"] is None else f"{r['build_ratio_vs_kfac']:.2f}"
        print(f"{r['problem']:12} {r['estimate']:40} {r['stored']:>8} {r['random']:>12.3f} "
              f"{r['top']:>12.3f} {ratio:>10}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    RESULTS.mkdir(exist_ok=True)
    out = dict(device=f"cpu ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads)",
               torch=torch.__version__, commit=commit, args=vars(args),
               kfac_available=KFAC is not None, rows=rows)
    (RESULTS / "symmetry.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
