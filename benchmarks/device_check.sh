#!/usr/bin/env bash
# The GPU checks in one run (for a lent CUDA machine with PyTorch installed but not curvkit):
#   1. the device tests (tests/*/test_*_device.py) with CURVKIT_TEST_DEVICE=$DEV;
#   2. benchmarks/kfac.py on the GPU at the issue's sizes and at larger batches, and
#      benchmarks/kfac_profile.py (launch and synchronisation counts against curvlinops);
#   3. benchmarks/pinn.py --per-step on the GPU (5-d Poisson, every method);
#   4. a short L2-against-time run of benchmarks/pinn.py on the GPU;
#   5. the rest of the test suite on that machine (its torch, with a GPU present).
# Logs and JSON go to $OUT (default ./device-out). Optional wheels (curvlinops and its
# dependencies, for the KFAC comparison) are installed from .whl/ when present.
# Stage budgets in seconds: STAGE_TESTS, STAGE_KFAC, STAGE_KFAC_LARGE, STAGE_KFAC_PROFILE,
# STAGE_PER_STEP, STAGE_RUN, STAGE_SUITE
# (0 skips a stage); PINN_BUDGET / PINN_BUDGET_2D seconds per method in stage 4.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
DEV=${DEV:-cuda}  # DEV=cpu QUICK=--quick: a dry run of this script on a machine without GPU
QUICK=${QUICK:-}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# curvkit itself, from this checkout (the machine has no registry: no dependencies fetched)
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "install failed"
summary=()
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    [ "$limit" = 0 ] && return
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s")
    echo "== $name (rc=$rc, $((SECONDS - t0)) s); last lines:"
    tail -n 15 "$OUT/$name.log"
}
workers() {  # pytest's -n N where pytest-xdist is installed
    $PY -c "import xdist" 2>/dev/null && echo "-n $1"
}
nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"

stage tests "${STAGE_TESTS:-240}" env CURVKIT_TEST_DEVICE=$DEV $PY -m pytest -q -p no:cacheprovider \
    $(workers "${TEST_WORKERS:-4}") tests/*/test_*_device.py
stage kfac "${STAGE_KFAC:-90}" $PY benchmarks/kfac.py --device $DEV --repeats 15 $QUICK \
    --out "$OUT/kfac_cuda.json"
stage kfac_large "${STAGE_KFAC_LARGE:-90}" $PY benchmarks/kfac.py --device $DEV --repeats 15 \
    --mlp-batch 8192 --cnn-batch 2048 --lm-batch 256 --out "$OUT/kfac_cuda_large.json"
stage kfac_profile "${STAGE_KFAC_PROFILE:-60}" $PY benchmarks/kfac_profile.py --device $DEV \
    --out "$OUT/kfac_profile_cuda.json"
stage per_step "${STAGE_PER_STEP:-150}" $PY benchmarks/pinn.py --device $DEV --per-step 5 $QUICK \
    --methods engd engd_woodbury spring engd_woodbury_nystrom hessian_free adam \
    --out "$OUT/pinn_cuda"
stage run "${STAGE_RUN:-280}" $PY benchmarks/pinn.py --device $DEV --budget "${PINN_BUDGET:-40}" \
    --budget-2d "${PINN_BUDGET_2D:-20}" $QUICK --out "$OUT/pinn_cuda_run"
# -v: a failure is named as it happens, also when the stage runs out of time
stage suite "${STAGE_SUITE:-100}" $PY -m pytest -v -p no:cacheprovider $(workers 14) -rf \
    --tb=short --ignore-glob='*_device.py'
grep -E "(FAILED|ERROR) tests" "$OUT/suite.log" | sort -u | head -40
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# The tool brings back few files: everything in one archive.
tar -czf /tmp/device_check.tar.gz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/device_check.tar.gz "$OUT/"
