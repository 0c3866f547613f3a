#!/usr/bin/env bash
# The share of training text the teacher writes (--generated_fraction), measured on the packaged model: the
# default recipe (3 epochs of 1024-token sequences, distilled, lr 5e-4) at each fraction and seed of RUNS, all on
# one GPU at once (each held to --max_memory_gb $MEMORY_GB: the model is small, and the runs are bound by the
# host, not by the card). Perplexity on the corpus's validation windows and on the held-out text (held_out.py),
# before, after and for the dense teacher; one summary line per run in $OUT/sweep.jsonl.
#
# The runs share the card, so their timings say nothing about speed (benchmarks/bench_generate.py measures that).
# Five runs of 14 GiB fit an 80 GB card with their CUDA contexts; EXTRA adds flags to every run.
#
#   OUT=sweep RUNS="0:0 0.5:0 0.25:0 0:1 0.5:1" bash benchmarks/sweep_teacher_text.sh
#   OUT=sweep RUNS="0.1:0:0 0.1:1:50 0.2:0:0:4 0.5:0:0:16:add" bash benchmarks/sweep_teacher_text.sh
#   (fraction:seed:top_k:prompt_tokens:mode)
set -uo pipefail
OUT=${OUT:-sweep_logs}
ROOT=${ROOT:-/tmp/sweep}
RUNS=${RUNS:-"0:0 0.5:0 0.25:0 0:1 0.5:1"}  # fraction:seed[:top_k[:prompt_tokens[:mode]]] (the fine-tune's defaults when left out)
MEMORY_GB=${MEMORY_GB:-14}  # 12 was too tight: a run peaked 1 GiB above its trial (RESULTS.md)
# The packaged model's rate, given explicitly: both sweeps of 2026-12-07 ran at 5e-5, the rate for your own model,
# which a pruned copy of the packaged model took then when given as a path (RESULTS.md).
LR=${LR:-5e-4}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$ROOT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2

# The pruned model (the prune command's default) and its dense parent saved as safetensors: each run loads the
# teacher in a second rather than de-quantizing the packaged GGUF again. A second sweep into the same ROOT (more
# runs on a machine still up) reuses them.
[ -f "$ROOT/pruned_model/config.json" ] || "$PYTHON" -m sparse_adamw.pipeline.prune --output_dir "$ROOT/pruned_model" \
    > "$OUT/prune.log" 2>&1 &
[ -f "$ROOT/dense/config.json" ] || "$PYTHON" - "$ROOT/dense" <<'PY' > "$OUT/dense.log" 2>&1
import sys
from sparse_adamw.pipeline.models import load_model, save_model
model, tokenizer = load_model("smollm2-135m", "cpu", "float32")
save_model(model, tokenizer, sys.argv[1])
PY
wait
[ -f "$OUT/prune.log" ] && tail -2 "$OUT/prune.log"

# "fraction:seed[:top_k[:prompt_tokens[:mode]]]" -> the fraction, the seed, the flags and the run's name
parse() {
    IFS=: read -r fraction seed top_k prompt mode <<< "$1"
    flags="${top_k:+--generated_top_k $top_k} ${prompt:+--generated_prompt_tokens $prompt} ${mode:+--generated_mode $mode}"
    name="f${fraction}_s${seed}${top_k:+_k$top_k}${prompt:+_p$prompt}${mode:+_$mode}"
}

for run in $RUNS; do
    parse "$run"
    "$PYTHON" -m sparse_adamw.pipeline.finetune --model "$ROOT/pruned_model" --teacher "$ROOT/dense" \
        --output_dir "$ROOT/$name" --generated_fraction "$fraction" --seed "$seed" --max_memory_gb "$MEMORY_GB" \
        --learning_rate "$LR" $flags \
        --save_strategy no ${EXTRA:-} > "$OUT/$name.log" 2>&1 &
done
wait

for run in $RUNS; do
    parse "$run"
    "$PYTHON" - "$ROOT/$name/finetune_report.json" "$fraction" "$seed" "$name" <<'PY' >> "$OUT/sweep.jsonl"
import json, sys
path, fraction, seed, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    r = json.load(open(path))
except OSError as err:
    print(json.dumps({"run": name, "fraction": fraction, "seed": seed, "error": str(err)}))
    sys.exit()
ood = r["out_of_domain"]
print(json.dumps({"run": name, "fraction": fraction, "seed": seed, "perplexity": r["perplexity"],
                  "recovered": r["recovered_fraction"], "ood_perplexity": ood["perplexity"],
                  "ood_recovered": ood["recovered_fraction"], "ood_by_kind": ood["by_kind"], "steps": r["steps"],
                  "teacher_text": r["teacher_text"], "train_s": r["timings_s"].get("train_s"),
                  "versions": r["versions"]}))
PY
done
cat "$OUT/sweep.jsonl"
