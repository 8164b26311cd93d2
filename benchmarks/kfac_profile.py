"""Where one KFAC factor computation spends its launches: curvkit against curvlinops 3.0.1.

On a GPU at the benchmark sizes both libraries are bound by launch and Python overhead, not by
arithmetic. This script runs one ``compute()`` of each under ``torch.profiler`` and counts what
that overhead is made of: ATen calls, kernel launches, host synchronisations (``item``/
``tolist``/``cudaStreamSynchronize``), copies; and lists the ATen ops where the two differ most.

    python benchmarks/kfac_profile.py --device cuda --out kfac_profile.json

Same models and options as ``benchmarks/kfac.py`` (MC Fisher, one sample, separate bias).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from kfac import OURS, RESULTS, add_case_args, curvlinops, curvlinops_kfac, setup  # noqa: E402

from curvkit.curvature.kfac import KFAC  # noqa: E402

SYNC_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaMemcpy")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def counts(fn, device):
    """Per-name call counts of one run of ``fn`` (after one warm-up run)."""
    fn()
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


def summary(c):
    aten = sum(v for k, v in c.items() if k.startswith("aten::"))
    return {"aten_calls": aten,
            "launches": sum(c[k] for k in LAUNCH_NAMES),
            "syncs": {k: c[k] for k in SYNC_NAMES if c[k]},
            "copies": c["aten::copy_"], "memcpy_async": c["cudaMemcpyAsync"]}


def run_model(name, args):
    model, X, y, loss_fn, data, params = setup(name, args, torch.Generator().manual_seed(0))
    libs = {"ours": KFAC(model, loss_fn, data, params=params, **OURS).compute}
    if curvlinops is not None:
        libs["curvlinops"] = curvlinops_kfac(model, loss_fn, params, data).compute_kronecker_factors

    def grad():
        model.zero_grad()
        loss_fn(model(X), y).backward()

    libs["grad"] = grad
    found = {k: counts(fn, args.device) for k, fn in libs.items()}
    row = {"model": name, **{k: summary(c) for k, c in found.items()}}
    if "curvlinops" in found:
        a, b = found["ours"], found["curvlinops"]
        keys = {k for k in a.keys() | b.keys() if k.startswith(("aten::", "cuda", "cu"))}
        diff = sorted(keys, key=lambda k: -abs(a[k] - b[k]))[: args.top]
        row["most_different"] = [[k, a[k], b[k]] for k in diff if a[k] != b[k]]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p)
    p.add_argument("--top", type=int, default=25, help="ops listed where the counts differ")
    p.add_argument("--out", default=str(RESULTS / "kfac_profile.json"))
    args = p.parse_args(argv)
    rows = [run_model(m, args) for m in args.models.split(",")]
    for r in rows:
        print(f"== {r['model']}")
        for lib in ("grad", "ours", "curvlinops"):
            if lib in r:
                print(f"  {lib:10s} {r[lib]}")
        for k, ours, theirs in r.get("most_different", []):
            print(f"    {k:45s} ours {ours:5d}  curvlinops {theirs:5d}")
    out = Path(args.out)
    out = out if out.parent != Path(".") else RESULTS / out
    out.write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                               "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
