#!/usr/bin/env bash
# One device call: install, GPU tests, then the step benchmark. Logs go to $OUT (or ./gpu_logs).
# Usage: bash benchmarks/gpu_check.sh [extra bench_step.py args]
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python benchmarks/bench_step.py --csv "$OUT/bench_step.csv" "$@" 2>&1 | tee "$OUT/bench_step.log" | tail -60
