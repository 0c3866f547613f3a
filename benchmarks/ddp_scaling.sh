#!/usr/bin/env bash
# One device call (2 GPUs): run_dense_finetune.sh on a random-init LLaMA-7B-shaped model (32 layers, 20% of 16x16
# blocks pruned, a 32000-word tokenizer) on 1 GPU, 2 GPUs (DDP) and 2 GPUs (FSDP2), each under the default memory
# plan on an emulated 80 GB card; the steady tokens/s of each run (finetune_report.json) compare them.
# Usage: bash benchmarks/ddp_scaling.sh   (the offline corpus must be importable; logs go to $OUT)
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-14}
[[ -d /tmp/r7b ]] || "$PYTHON" benchmarks/make_random_llama.py --layers 32 --tokenizer words:32000 \
    --output_dir /tmp/r7b > "$OUT/make.log" 2>&1 || { tail "$OUT/make.log"; exit 1; }
for run in "1" "2" "2 --fsdp"; do
    set -- $run
    name="ddp$1${2:+_fsdp2}"
    timeout 200 bash run_dense_finetune.sh --yes --num_gpus "$@" --model /tmp/r7b --output_dir "/tmp/$name" \
        --overwrite_output_dir --max_train_samples $((8 * STEPS)) --num_train_epochs 1 --logging_steps 2 \
        --skip_eval --no_distill --max_memory_gb 80 > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    grep -E "Memory plan|tried|^Training:|Error|error" "$OUT/$name.log" | tail -8
    "$PYTHON" - "$name" <<'PY'
import json, sys
r = json.load(open(f"/tmp/{sys.argv[1]}/finetune_report.json"))
print(sys.argv[1], {k: r.get(k) for k in ("steps", "tokens_per_s", "steady_tokens_per_s", "peak_memory_bytes", "world_size", "memory_plan")})
PY
done
