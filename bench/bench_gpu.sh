#!/usr/bin/env bash
# GPU benchmark in one command, from a fresh checkout (target: under 5 minutes on one modern GPU).
#
#   bash bench/bench_gpu.sh                 # install into .venv-gpu if needed, then benchmark and GPU tests
#   PYTHON=/path/to/python bash bench/bench_gpu.sh   # use a Python that already has torch + open_clip + segment_anything
#
# Prints, for zip-cpu and zip-paper with real architectures and random weights, bf16, batch sizes 1/4/8 and
# torch.compile off/on: images/s, peak GPU memory, and the fraction of this GPU's bf16 matmul peak (measured in
# the same run); then runs the tests marked `gpu` (batched equals single, a real out-of-memory back-off, two
# workers pinned to one GPU). Figures go to stdout and to bench/gpu-results.json.
#
# On this workplace's lent GPU machine (no network): first `bash bench/gpu_carry.sh` here, then carry .whl and
# .gpu-data; the wheels are installed into /tmp/site without an index and the images read from .gpu-data.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .gpu-data/coco128-seg ] && export LABELGEN_COCO128="$PWD/.gpu-data/coco128-seg"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if python3 -c "import torch, open_clip, segment_anything, pycocotools, yaml" 2>/dev/null; then
    PY=python3
  else
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e ".[models,dev]"
    PY=.venv-gpu/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PY" bench/bench_gpu.py "$@"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
