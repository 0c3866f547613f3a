#!/usr/bin/env bash
# One device call (2 GPUs): install, the GPU test suite (NCCL tests need 2 GPUs), then the LLaMA-7B-shaped
# fine-tune step side by side: the guide's configuration against the default plan (with and without Liger, and
# distilling), on an emulated 80 GB card, and the plan unrestricted. Logs and CSV go to $OUT (or ./gpu_logs).
# Usage: bash benchmarks/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
SPARSE_ADAMW_CUDA_ARCHS=${SPARSE_ADAMW_CUDA_ARCHS:-90} python -m pip install -q -e . --no-deps --no-build-isolation \
    > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
python -c "import torch, triton, transformers; import importlib.metadata as m; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'liger', m.version('liger-kernel'), torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPUs')" | tee "$OUT/versions.txt"
timeout 280 python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
for cap in 80 ""; do
    name=$([[ -n "$cap" ]] && echo "${cap}gb" || echo unrestricted)
    contenders=$([[ -n "$cap" ]] && echo "guide plan plan_no_liger plan_distill" || echo "plan")
    timeout 240 python benchmarks/bench_finetune.py --layers 32 --param_dtype bf16 --contenders $contenders \
        ${cap:+--max_memory_gb $cap} --steps 4 --csv "$OUT/bench_finetune.csv" 2>&1 \
        | tee "$OUT/bench_finetune_7b_$name.log" | tail -14
done
