#!/usr/bin/env bash
# GPU acceptance run (issue 21 item 6): bash benchmarks/gpu.sh [OUTDIR] [gpu.py options, e.g. --smoke]
# Writes OUTDIR (default benchmarks/results/gpu): gpu.json, gpu.md, pytest.txt, gpu.log. Under 8 minutes on one
# H100/H200 (every part time-boxed, see benchmarks/gpu.py). Meant for a lent GPU machine with no network: diffusers
# comes from wheels carried in .whl/ if it is not installed (benchmarks/README.md says how to fetch them).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results/gpu}
shift || true
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lcmkit-site .whl/*.whl \
    && export PYTHONPATH=/tmp/lcmkit-site${PYTHONPATH:+:$PYTHONPATH}
fi
# lcmkit's plug-ins (the world dataset the CUDA distillation tests use) are entry points: they need the package's
# metadata, so install this checkout (editable, offline, no dependencies) where it is not installed yet
if ! "$PY" -c "import importlib.metadata as m; m.distribution('lcmkit')" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "gpu.sh: could not install the checkout; tests needing the world dataset will skip"
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
set -o pipefail
timeout 475 "$PY" benchmarks/gpu.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
