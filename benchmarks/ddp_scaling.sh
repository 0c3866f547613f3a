#!/usr/bin/env bash
# One device call (2 GPUs): run_dense_finetune.sh on a random-init LLaMA-7B-shaped model (32 layers, 20% of 16x16
# blocks pruned, a 32000-word tokenizer) on 1 GPU and on 2 GPUs (the default: the sharded step; DDP; FSDP2), each
# under the default memory plan on an emulated 80 GB card; the steady tokens/s of each run (finetune_report.json)
# compare them.
# Usage: RUNS="1 2 2d 2f" bash benchmarks/ddp_scaling.sh
#   (the offline corpus must be importable; logs go to $OUT; RUNS: 1 = one GPU (GPU 0), 1@N = one GPU on GPU N,
#   2 = two GPUs with the default --data_parallel (auto: the sharded step), 2d = DDP, 2f = FSDP2;
#   one H200 differs from the next by a few %, and two GPUs go at the slower one's pace: "1 1@1 2" measures both;
#   STATE_DTYPE=float32 for fp32 optimizer states; EXTRA="--ddp_bucket_cap_mb 100" TAG=b100: more flags, and a
#   name for the runs' logs)
# No checkpoint is written (--save_strategy no): the 7B state takes a minute to write and is not what is timed.
# The loss is logged as the fine-tune does by default, every 10 steps: each log waits for the GPU. (The runs in
# benchmarks/RESULTS.md before its section "Host time in the sharded step" logged every 2 steps.)
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-14}
STATE_DTYPE=${STATE_DTYPE:-bfloat16}
EXTRA=${EXTRA:-}
[[ -d /tmp/r7b ]] || "$PYTHON" benchmarks/make_random_llama.py --layers 32 --tokenizer words:32000 \
    --output_dir /tmp/r7b > "$OUT/make.log" 2>&1 || { tail "$OUT/make.log"; exit 1; }
for run in ${RUNS:-1 2 2d 2f}; do
    gpus=${run%[df]}
    gpus=${gpus%@*}
    case "$run" in
        *d) mode=(--data_parallel ddp); kind=_ddp ;;
        *f) mode=(--fsdp); kind=_fsdp2 ;;
        *@*) mode=(--gpu_ids "${run#*@}"); kind="_on${run#*@}" ;;
        *) mode=(); kind="" ;;
    esac
    name="gpu${gpus}${kind}_${STATE_DTYPE}${TAG:+_$TAG}"
    timeout "${RUN_TIMEOUT:-200}" bash run_dense_finetune.sh --yes --num_gpus "$gpus" \
        ${mode[@]+"${mode[@]}"} --model /tmp/r7b --output_dir "/tmp/$name" --overwrite_output_dir \
        --max_train_samples $((8 * STEPS)) --num_train_epochs 1 --skip_eval --no_distill \
        --max_memory_gb 80 --state_dtype "$STATE_DTYPE" --save_strategy no $EXTRA > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    grep -E "Memory plan|tried|Data parallel|^Training:|Error|error" "$OUT/$name.log" | tail -8
    "$PYTHON" - "$name" <<'PY'
import json, sys
try:
    r = json.load(open(f"/tmp/{sys.argv[1]}/finetune_report.json"))
except OSError as err:
    sys.exit(f"{sys.argv[1]}: no report ({err})")
plan = r.get("memory_plan") or {}
print(sys.argv[1], {k: r.get(k) for k in ("steps", "tokens_per_s", "steady_tokens_per_s", "checkpoint_s",
                                          "peak_memory_bytes", "world_size", "data_parallel")},
      {k: plan.get(k) for k in ("micro_batch", "gradient_checkpointing", "gradient_accumulation_steps")})
PY
done
