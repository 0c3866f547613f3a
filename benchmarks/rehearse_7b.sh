#!/usr/bin/env bash
# The 7B fine-tune as a user runs it, whole, through the CLIs, in one device call on an 80 GB card (2 GPUs when
# there are 2): a dense random-init LLaMA-2-7B-shaped model (make_random_llama.py --sparsity 0), pruned by the
# prune command (Wanda, 20% of 16x16 blocks), then run_dense_finetune.sh with its defaults (distillation from the
# dense parent, the memory plan, evaluation on a few windows) and a checkpoint every few steps; SIGTERM mid-run, as a
# batch scheduler sends it; the same command again (it resumes and must finish); and once more (it says the run is
# complete).
#
# First at 32 layers. Where the disk cannot hold that run with its teacher, the disk plan refuses it before anything
# loads; then the script removes the 32-layer models and rehearses at the largest depth whose models and run fit.
#
# Logged to $OUT: each command's output with a time stamp per line, the output folder's size every half second (its
# high-water mark against the disk plan's estimate), nvidia-smi's memory use every second, and a summary
# (rehearsal_summary.json): time to the first step, steady tokens/s, each checkpoint's size and pause, the training
# time lost after each, the whole run's peak GPU memory against the plan's trial peak, and the loss just before the
# interruption and just after the resume.
#
# Usage (from the repository root; the offline corpus must be importable):
#   bash benchmarks/rehearse_7b.sh
#   LAYERS=32 ROOT=/tmp/rehearsal MAX_STEPS=90 SAVE_STEPS=25 STOP_AFTER=2 NSAMPLES=16 bash benchmarks/rehearse_7b.sh
#   TINY=1 bash benchmarks/rehearse_7b.sh     # the same path with a tiny model, on the CPU (a trial of the script)
set -uo pipefail
OUT=${OUT:-rehearsal_logs}
ROOT=${ROOT:-/tmp/rehearsal}
LAYERS=${LAYERS:-32}
MAX_STEPS=${MAX_STEPS:-90}
SAVE_STEPS=${SAVE_STEPS:-25}
STOP_AFTER=${STOP_AFTER:-2}  # SIGTERM once this many checkpoints are complete, two steps later
NSAMPLES=${NSAMPLES:-16}
EVAL_WINDOWS=${EVAL_WINDOWS:-4}
mkdir -p "$OUT" "$ROOT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHON=${PYTHON:-python3}
if [[ "${TINY:-0}" == 1 ]]; then
    SIZE=(--hidden_size 64 --intermediate_size 128 --heads 4)
    TOKENIZER=words:2000
    RUN=(--block_size 64 --use_cpu)
    PRUNE=(--device cpu)
    GPUS=()
else
    SIZE=()
    TOKENIZER=words:32000
    RUN=(--max_memory_gb 80)
    PRUNE=()
    n=$(nvidia-smi -L 2>/dev/null | wc -l)
    GPUS=(--num_gpus $(( n >= 2 ? 2 : 1 )))
fi

stamp() {  # each line prefixed with the seconds since the script began
    "$PYTHON" -u -c '
import sys, time
start = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - start:8.1f} {line}")
    sys.stdout.flush()' "$START"
}
START=$(date +%s.%N)

{
    echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
    lscpu 2>/dev/null | grep -E "^Model name|^CPU\(s\)"
    free -g | head -2
    df -h "$ROOT" | tail -1
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

make_models() {  # $1 = layers: the dense model, then the prune command's pruned one (with its masks and report)
    rm -rf "$ROOT/dense" "$ROOT/pruned_model" "$ROOT/out"
    "$PYTHON" benchmarks/make_random_llama.py --layers "$1" --sparsity 0 --tokenizer "$TOKENIZER" "${SIZE[@]}" \
        --output_dir "$ROOT/dense" 2>&1 | stamp | tee "$OUT/make_$1.log" | tail -2
    "$PYTHON" -m sparse_adamw.pipeline.prune --model "$ROOT/dense" --output_dir "$ROOT/pruned_model" \
        --nsamples "$NSAMPLES" "${PRUNE[@]}" 2>&1 | stamp | tee "$OUT/prune_$1.log" | tail -3
}

finetune() {  # the user's command: $1 = log name
    bash run_dense_finetune.sh --yes "${GPUS[@]}" --model "$ROOT/pruned_model" --output_dir "$ROOT/out" \
        --max_steps "$MAX_STEPS" --save_steps "$SAVE_STEPS" --max_eval_windows "$EVAL_WINDOWS" --logging_steps 1 \
        "${RUN[@]}" 2>&1 | stamp > "$OUT/$1.log"
    return "${PIPESTATUS[0]}"
}

watch() {  # the output folder's high-water mark and the GPUs' memory, in the background while the runs go on
    ( peak=0; while sleep 0.5; do s=$(du -sb "$ROOT/out" 2>/dev/null | cut -f1); s=${s:-0}
        (( s > peak )) && { peak=$s; echo "$peak" > "$OUT/disk_high_water.txt"; }; done ) &
    WATCHERS=($!)
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/nvidia_smi_memory.csv" &
        WATCHERS+=($!)
    fi
}

run1() {  # $1 = layers: the first run, sent SIGTERM two steps after the STOP_AFTER-th complete checkpoint
    local log="$OUT/run1_$1_layers.log" target="" last done_ckpts
    finetune "run1_$1_layers" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        last=$(grep -oE "Step [0-9]+:" "$log" 2>/dev/null | tail -1 | grep -oE "[0-9]+")
        if [[ -z "$target" ]]; then
            done_ckpts=$(grep -c "Checkpoint checkpoint-.*written" "$log" 2>/dev/null)
            (( ${done_ckpts:-0} >= STOP_AFTER )) && target=$(( ${last:-0} + 2 ))
        elif [[ "$target" != sent ]] && (( ${last:-0} >= target )); then
            pkill -TERM -f "sparse_adamw.pipeline.finetune" && echo "== SIGTERM after step ${last}"
            target=sent
        fi
        sleep 0.2
    done
    wait "$pid"
}

# ----------------------------------------------------------------------- at 32 layers, or the depth that fits
depth=$LAYERS
make_models "$depth"
rm -rf "$ROOT/out"
watch
run1 "$depth"; code=$?
echo "== run 1 at ${depth} layers: exit ${code}"
if [[ "$code" == 2 ]] && grep -q "needs .* more in" "$OUT/run1_${depth}_layers.log"; then
    grep -E "Disk plan|error" "$OUT/run1_${depth}_layers.log" | tail -2
    kill "${WATCHERS[@]}" 2>/dev/null
    rm -rf "$ROOT/dense" "$ROOT/pruned_model" "$ROOT/out"
    # The largest depth whose two models (dense and pruned) and run fit the free space, by the disk plan.
    depth=$("$PYTHON" - "$ROOT" "$LAYERS" "$MAX_STEPS" "$SAVE_STEPS" "${SIZE[@]}" <<'PY'
import sys
import torch
from transformers import LlamaConfig
from sparse_adamw.pipeline.checkpoints import config_shapes, free_bytes, plan_disk

root, layers, max_steps, save_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
size = dict(zip(sys.argv[5::2], sys.argv[6::2]))
dims = dict(hidden_size=int(size.get("--hidden_size", 4096)), intermediate_size=int(size.get("--intermediate_size",
            11008)), num_attention_heads=int(size.get("--heads", 32)))
dims["num_key_value_heads"] = dims["num_attention_heads"]
vocab = 2000 if "--hidden_size" in size else 32000
free = free_bytes(root)
for depth in range(layers - 1, 0, -1):
    config = LlamaConfig(num_hidden_layers=depth, vocab_size=vocab, **dims)
    plan = plan_disk(f"{root}/out", None, shapes=config_shapes(config), dtype=torch.bfloat16,
                     state_dtype=torch.bfloat16, masks_file=None, world_size=1, mode=None, save_steps=save_steps,
                     max_steps=max_steps, keep=1, checkpoint_at_end=False)
    if 2 * plan.weights + plan.high_water <= 0.97 * free:  # the dense and the pruned model, then the run
        print(depth)
        break
PY
)
    echo "== the largest depth that fits: ${depth} layers"
    make_models "$depth"
    watch
    run1 "$depth"; code=$?
    echo "== run 1 at ${depth} layers: exit ${code}"
fi
finetune "run2_${depth}_layers"; echo "== run 2 (the same command: resumes): exit $?"
finetune "run3_${depth}_layers"; echo "== run 3 (the same command again): exit $?"
kill "${WATCHERS[@]}" 2>/dev/null
grep -h "already complete" "$OUT/run3_${depth}_layers.log"

"$PYTHON" - "$OUT" "$ROOT" "$depth" <<'PY' | tee "$OUT/rehearsal_summary.json"
import json, re, statistics, sys
out, root, depth = sys.argv[1], sys.argv[2], sys.argv[3]
logs = {k: open(f"{out}/run{k}_{depth}_layers.log").read().splitlines() for k in (1, 2, 3)}
step = re.compile(r"^\s*([\d.]+) Step (\d+): loss=([\d.]+)")
ckpt = re.compile(r"^\s*([\d.]+) Checkpoint (checkpoint-\d+): ([\d.]+ [kMG]?B), (.*)$")
plan = re.compile(r"Disk plan: at most ([\d.]+) ([kMG]B)")
units = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
summary = {"layers": int(depth)}
for k, lines in logs.items():
    steps = [(float(m[1]), int(m[2]), float(m[3])) for m in map(step.match, lines) if m]
    run = {"steps": [steps[0][1], steps[-1][1]] if steps else None,
           "checkpoints": [{"name": m[2], "size": m[3], "how": m[4]} for m in map(ckpt.match, lines) if m]}
    starts = [float(line.split()[0]) for line in lines if "Starting dense fine-tuning" in line]
    if steps and starts:
        run["time_to_first_step_s"] = round(steps[0][0] - starts[0], 1)
    if len(steps) > 4:
        gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
        median = statistics.median(gaps[3:])
        run["median_step_s"] = round(median, 3)
        # training time lost after each checkpoint: the steps until the next one, against the median step
        lost = {}
        for c in run["checkpoints"]:
            n = int(c["name"].split("-")[1])
            after = [b[0] - a[0] for a, b in zip(steps, steps[1:]) if n < b[1] <= n + 10]
            lost[c["name"]] = round(sum(g - median for g in after), 2)
        run["lost_after_checkpoint_s"] = lost
    if steps:
        run["first_loss"], run["last_loss"] = steps[0][2], steps[-1][2]
    m = next(filter(None, map(plan.search, lines)), None)
    if m:
        run["disk_plan_bytes"] = float(m[1]) * units[m[2]]
    summary[f"run{k}"] = run
try:
    report = json.load(open(f"{root}/out/finetune_report.json"))
    summary["report"] = {k: report.get(k) for k in ("steady_tokens_per_s", "tokens_per_s", "checkpoints",
                                                    "training_peak_memory_bytes", "resumed_from", "steps")}
    summary["report"]["memory_plan"] = {k: (report.get("memory_plan") or {}).get(k) for k in (
        "micro_batch", "gradient_checkpointing", "gradient_accumulation_steps", "trial_peak_bytes",
        "training_peak_bytes", "budget_bytes")}
    summary["report"]["perplexity"] = report.get("perplexity")
except OSError as err:
    summary["report"] = f"no report: {err}"
try:
    summary["disk_high_water_bytes"] = int(open(f"{out}/disk_high_water.txt").read())
except OSError:
    pass
print(json.dumps(summary, indent=1))
PY
