#!/usr/bin/env bash
# One device call on a 4-GPU host: run_dense_finetune.sh on 1, 2 and 4 GPUs (DDP through torchrun) with a
# random-init LLaMA-7B-shaped model of 4 layers, then FSDP2 memory for the 32-layer shape on 2 GPUs.
# Usage: [GPU_COUNTS="1 2"] bash benchmarks/multigpu_check.sh TOKENIZER_DIR   (the offline corpus must be importable)
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON=${PYTHON:-python3}
"$PYTHON" benchmarks/make_random_llama.py --layers 4 --tokenizer "$1" --output_dir /tmp/r7b > "$OUT/make.log" 2>&1 \
    || { tail "$OUT/make.log"; exit 1; }
for n in ${GPU_COUNTS:-1 2 4}; do
    bash run_dense_finetune.sh --yes --num_gpus "$n" --model /tmp/r7b --output_dir "/tmp/ddp$n" --max_steps 30 \
        --logging_steps 5 --skip_eval > "$OUT/ddp$n.log" 2>&1
    echo "== $n GPU(s)"; grep -E "^Step|tokens/s|Error" "$OUT/ddp$n.log" | tail -8
done
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/bench_fsdp2.py --layers 32 \
    > "$OUT/fsdp2.log" 2>&1
tail -4 "$OUT/fsdp2.log"
