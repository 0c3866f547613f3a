#!/usr/bin/env bash
# One device call (2 GPUs), the packaged model installed: GPU 0 runs the default command as a user would, alone on
# its card (tests/test_run_script.py's GPU test: its time counts); GPU 1 runs fine-tuning recipes side by side
# (benchmarks/sweep_recipes.py, --parallel 3: their perplexities are as alone, their times are not).
# Usage: bash benchmarks/quality_gpu.sh "NAME=FLAGS" ...   (logs and CSV go to $OUT)
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
CUDA_VISIBLE_DEVICES=0 SPARSE_ADAMW_LOG_DIR="$OUT" timeout 560 python -m pytest -m gpu -q -s -p no:cacheprovider \
    tests/test_run_script.py -k default_command > "$OUT/pytest_default_command_gpu.log" 2>&1 &
recipes=()
for r in "$@"; do recipes+=(--recipe "$r"); done
CUDA_VISIBLE_DEVICES=1 timeout 560 python benchmarks/sweep_recipes.py --parallel 3 --root /tmp/sweep \
    --csv "$OUT/recipes_gpu.csv" "${recipes[@]}" > "$OUT/sweep_gpu.log" 2>&1
cp /tmp/sweep/*.log "$OUT/" 2>/dev/null
wait
tail -3 "$OUT/pytest_default_command_gpu.log"; grep -E "^Perplexity|Recovered|^Training:|Memory plan" "$OUT/default_command_gpu.log"
cat "$OUT/recipes_gpu.csv"
