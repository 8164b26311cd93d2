"""KFAC / EKFAC benchmark: curvkit against curvlinops 3.0.1 on the three curvature-benchmark models.

Measures, per model (float32, one batch):

- ``grad``: one forward + backward of the mean loss (the unit);
- ``factors``: KFAC factor computation (MC Fisher, one sample, expand), ours and curvlinops's
  (construction + ``compute_kronecker_factors``), as multiples of ``grad`` and ours / theirs;
- ``inverse product``: one product with the damped inverse (heuristic damping, built once
  beforehand), ours and curvlinops's ``KFACInverseLinearOperator``;
- ``ekfac correction`` (CNN): EKFAC compute minus KFAC compute (eigendecompositions plus the
  correction pass), as a multiple of ``grad``.

Timings are interleaved across methods and repeated; medians are reported.

Usage:
    python benchmarks/kfac.py            # the issue's sizes
    python benchmarks/kfac.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from curvkit.curvature.ekfac import EKFAC
from curvkit.curvature.kfac import KFAC

warnings.filterwarnings("ignore")  # curvlinops' imports emit torch deprecation warnings
try:
    import curvlinops
except ImportError:  # the benchmark still measures ours against the gradient
    curvlinops = None

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- models
def mlp(args):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def cnn(args):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, built from nn.Linear (as GPT-style models are)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        N, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(N, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(N, S, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, vocab, width, context, layers, heads=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, t):
        h = self.tok(t) + self.pos(torch.arange(t.shape[1], device=t.device))
        return self.head(self.ln(self.blocks(h))).transpose(1, 2)  # (N, V, S)


def transformer(args):
    return LM(args.vocab, args.width, args.context, args.layers)


def make_case(name, args, g):
    if name == "mlp":
        X = torch.randn(args.mlp_batch, 784, generator=g)
        return mlp(args), X, torch.randint(0, 10, (args.mlp_batch,), generator=g)
    if name == "cnn":
        X = torch.randn(args.cnn_batch, 3, 32, 32, generator=g)
        return cnn(args), X, torch.randint(0, 10, (args.cnn_batch,), generator=g)
    X = torch.randint(0, args.vocab, (args.lm_batch, args.context), generator=g)
    y = torch.randint(0, args.vocab, (args.lm_batch, args.context), generator=g)
    return transformer(args), X, y


# --------------------------------------------------------------------------- timing
def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # device work is asynchronous: time to its end


def timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def supported_params(model):
    # curvlinops's KFAC covers Linear and Conv2d only: compare on those parameters
    return [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            for p in m.parameters(recurse=False)]


# The compared configuration: MC Fisher, one sample, bias separate from the weight.
OURS = dict(fisher="mc", mc_samples=1, check_deterministic=False, separate_bias=True)


def setup(name, args, g):
    """Model, input, targets, loss, data and compared parameters of case ``name`` on the device
    (data drawn from the generator ``g``)."""
    torch.manual_seed(0)
    model, X, y = make_case(name, args, g)
    model = model.float().to(args.device)
    X, y = X.to(args.device), y.to(args.device)
    return model, X, y, nn.CrossEntropyLoss(), [(X, y)], supported_params(model)


def curvlinops_kfac(model, loss_fn, params, data):
    """curvlinops's operator in ``OURS``'s configuration (factors not yet computed)."""
    return curvlinops.KFACLinearOperator(model, loss_fn, params, data, fisher_type="mc",
                                         mc_samples=1, check_deterministic=False,
                                         separate_weight_and_bias=True)


def add_case_args(p):
    """The options that pick the models, their sizes and the device."""
    p.add_argument("--models", default="mlp,cnn,transformer")
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--cnn-batch", type=int, default=256)
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="e.g. cuda (timings synchronise the device)")


def run_model(name, args):
    g = torch.Generator().manual_seed(0)
    model, X, y, loss_fn, data, params = setup(name, args, g)

    def grad():
        model.zero_grad()
        loss_fn(model(X), y).backward()

    def ours():
        return KFAC(model, loss_fn, data, params=params, **OURS)

    def theirs():
        K = curvlinops_kfac(model, loss_fn, params, data)
        K.compute_kronecker_factors()
        return K

    methods = {"grad": grad, "ours": ours}
    if curvlinops is not None:
        methods["curvlinops"] = theirs
    times = {k: [] for k in methods}
    for fn in methods.values():  # warm-up
        fn()
    ours_op = theirs_op = None
    for _ in range(args.repeats):
        for k, fn in methods.items():
            t, out = timed(fn)
            times[k].append(t)
            if k == "ours":
                ours_op = out
            elif k == "curvlinops":
                theirs_op = out
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "params": sum(p.numel() for p in params), "grad_s": med["grad"],
           "factors_ours_s": med["ours"], "factors_ours_x_grad": med["ours"] / med["grad"]}
    if "curvlinops" in med:
        row.update(factors_curvlinops_s=med["curvlinops"],
                   factors_curvlinops_x_grad=med["curvlinops"] / med["grad"],
                   factors_ours_over_curvlinops=med["ours"] / med["curvlinops"])

    # damped-inverse product (inverse built once; one product timed)
    v = torch.randn(ours_op.shape[1], generator=g).float().to(args.device)
    inv_ours = ours_op.inverse(args.damping, heuristic="pi")
    prods = {"ours": lambda: inv_ours @ v}
    if theirs_op is not None:
        inv_theirs = curvlinops.KFACInverseLinearOperator(theirs_op, damping=args.damping,
                                                          use_heuristic_damping=True)
        vt = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params)]
        prods["curvlinops"] = lambda: inv_theirs @ vt
    ptimes = {k: [] for k in prods}
    for fn in prods.values():
        fn()
    for _ in range(args.repeats * 3):
        for k, fn in prods.items():
            ptimes[k].append(timed(fn)[0])
    pmed = {k: statistics.median(t) for k, t in ptimes.items()}
    row["invprod_ours_x_grad"] = pmed["ours"] / med["grad"]
    if "curvlinops" in pmed:
        row["invprod_curvlinops_x_grad"] = pmed["curvlinops"] / med["grad"]

    if name == "cnn" and not args.skip_ekfac:
        # EKFAC = KFAC factors + eigendecompositions + the correction pass; the last two are
        # timed separately through EKFAC's private stages.
        E = EKFAC(model, loss_fn, data, params=params, compute=False, **OURS)
        eig, corr, grads = [], [], []
        KFAC.compute(E)
        E._eigenbases()
        E._correct()  # warm-up
        for _ in range(args.repeats):
            KFAC.compute(E)
            eig.append(timed(E._eigenbases)[0])
            corr.append(timed(E._correct)[0])
            grads.append(timed(grad)[0])
        g_med = statistics.median(grads)
        row["ekfac_eigh_x_grad"] = statistics.median(eig) / g_med
        row["ekfac_correction_x_grad"] = statistics.median(corr) / g_med
    return row


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-ekfac", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    p.add_argument("--out", default=str(RESULTS / "kfac.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.mlp_batch, args.cnn_batch, args.lm_batch, args.repeats = 32, 16, 4, 2
        args.vocab, args.context = 64, 16
    torch.set_num_threads(args.threads)
    rows = [run_model(m, args) for m in args.models.split(",")]

    header = ("model", "params", "grad ms", "factors/grad ours", "factors/grad curvlinops",
              "ours/curvlinops", "inv-prod/grad ours", "inv-prod/grad curvlinops",
              "EKFAC eigh/grad", "EKFAC corr/grad")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["model"], str(r["params"]), fmt(1e3 * r["grad_s"], ".1f"),
                          fmt(r["factors_ours_x_grad"]), fmt(r.get("factors_curvlinops_x_grad")),
                          fmt(r.get("factors_ours_over_curvlinops")),
                          fmt(r["invprod_ours_x_grad"], ".3f"),
                          fmt(r.get("invprod_curvlinops_x_grad"), ".3f"),
                          fmt(r.get("ekfac_eigh_x_grad")),
                          fmt(r.get("ekfac_correction_x_grad"))]))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    device = (f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
              if torch.device(args.device).type == "cpu"
              else f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})")
    out = {"device": device,
           "torch": torch.__version__,
           "curvlinops": _version("curvlinops-for-pytorch") if curvlinops else None,
           "commit": commit, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "args": vars(args), "rows": rows}
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
