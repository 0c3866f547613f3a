#!/usr/bin/env bash
# Full fine-tuning of a block-pruned model with SparseTrainer (SparseAdamW) on 1, 2 or 4 GPUs, or on the CPU.
# Options of its own are listed by --help; every other argument goes to `python -m sparse_adamw.pipeline.finetune`.
# Without a terminal (stdin not a tty), the GPU memory prompt is never asked: the script aborts unless --yes.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="$(basename "$0")"
MIN_GPU_MEMORY_GB="${MIN_GPU_MEMORY_GB:-40}"
# The package of this checkout, wherever the script is run from (outputs go under the current directory).
export PYTHONPATH="${SCRIPT_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
# GPU ids are nvidia-smi's; make CUDA number the cards the same way.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
# Fewer, larger memory segments that can grow: less fragmentation over a long run, so the peak stays near the one
# the memory plan measured at the start.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# torchrun gives its workers this long to save the Ctrl+C checkpoint before it kills them (default 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"

usage() {
    cat <<EOF
Usage: ${NAME} [OPTIONS] [FINETUNE ARGS]

Options:
  --num_gpus N        Number of GPUs to use (default: 1)
                      (more GPUs than nvidia-smi lists is an error; with no GPU, leave it out: the CPU)
  --gpu_ids "X,Y"     Comma-separated GPU IDs, as nvidia-smi numbers them (default: the first N visible GPUs)
  --yes               Continue without asking when a GPU has less than ${MIN_GPU_MEMORY_GB} GB free
                      (without a terminal the script cannot ask, and stops unless --yes is given)
  --dry_run           Print the configuration and the command, then exit without training
                      (--plan_only goes further: it loads the model and measures the GPU memory plan, then exits)
  --nnodes N          Machines in the run (default 1); run this script on each, the same flags on all, with
  --node_rank R         this machine's number, 0 to N-1, and where they meet:
  --master_addr HOST    node 0's address (and --master_port P, default 29500), or
  --rdzv_endpoint H:P   a c10d rendezvous instead (no --node_rank needed)
                      Gradient accumulation counts every process of every node (effective batch 8)
  -h, --help          Show this help message

Every other argument goes to python -m sparse_adamw.pipeline.finetune (see its --help), for example
  --model DIR         the pruned model (default: SmolLM2-135M pruned by python -m sparse_adamw.pipeline.prune,
                      made first if missing; fully offline)
  --dataset wikitext  wikitext-2-raw-v1 instead of the offline corpus (or --dataset_path FILE)
  --output_dir DIR    default: dense_finetuned_model next to the pruned_model directory
  --data_parallel ddp several GPUs of one host default to the sharded step (each GPU steps its share of the
                      parameters; gradients and weights travel by copy engine, not NCCL); ddp runs DDP instead
  --fsdp              shard weights, gradients and optimizer state over the GPUs (FSDP2) instead
                      (2 or more GPUs; for models whose training state does not fit one GPU)
  --generated_fraction F  the dense teacher writes this share of the training sequences first (default
                      0.4 on GPUs when distilling, 0 on the CPU; 0 = off; see benchmarks/RESULTS.md), added
                      to the whole corpus in its number of steps (--generated_mode replace: in place of blocks)
  --ood_windows N     perplexity also on N windows of held-out novels, plays, speeches and recipes
                      (default 48 on GPUs, 8 on the CPU; 0 = off)
  --lora              train masked LoRA adapters on the frozen pruned model instead of every weight (less
                      memory); the merge keeps every pruned block zero. --lora_r, --lora_alpha, --lora_dropout,
                      --lora_target_modules (default: rank 16, alpha 32, dropout 0.05, every decoder Linear)
  --gradient_checkpointing, --max_steps N, --learning_rate LR, --num_train_epochs N, ...

Examples:
  Single GPU (default):     ./${NAME}
  Single GPU (GPU 3):       ./${NAME} --num_gpus 1 --gpu_ids "3"
  Dual GPU (GPU 2,3):       ./${NAME} --num_gpus 2 --gpu_ids "2,3"
  Quad GPU (GPU 0-3):       ./${NAME} --num_gpus 4 --gpu_ids "0,1,2,3"
  LLaMA-2-7B on wikitext:   ./${NAME} --num_gpus 2 --model out/llama2_7b/block_16x16_20sparsity/wanda/pruned_model --dataset wikitext
  Sharded (FSDP2), 4 GPUs:  ./${NAME} --num_gpus 4 --fsdp --model DIR
  Unattended (no prompt):   ./${NAME} --num_gpus 2 --yes > finetune.log 2>&1
  Two machines, 4 GPUs each: ./${NAME} --num_gpus 4 --nnodes 2 --node_rank 0 --master_addr node0 --model DIR
                            (the same on node1 with --node_rank 1)
  No GPU: the default command (no --num_gpus, no --gpu_ids) runs the offline demo on the CPU, in one process.

Gradient accumulation keeps the effective batch at 8: 1 GPU -> 8, 2 GPUs -> 4, 4 GPUs -> 2 (8 GPUs -> 1) at
micro-batch 1; on GPUs the memory plan picks the micro-batch, and accumulation = 8 / (micro-batch x GPUs).
Rerunning the same command resumes from the last checkpoint; Ctrl+C saves a checkpoint and stops.

Performance:
  No GPU, offline default (SmolLM2-135M, 2 CPU cores): ~10 minutes, perplexity 316 -> 57
    (benchmarks/RESULTS_cpu_finetune.md)
  SmolLM2-135M, the default (3 epochs, distilled) on one H200: 60 s of training, perplexity 375 -> 18.95
  LLaMA-2-7B shape, one GPU held to 80 GB, per machine (benchmarks/RESULTS.md):
    the memory plan trains at 13,392 to 14,160 tokens/s, 2.4x to 3.6x the guide's configuration (batch 1,
    checkpointing, gradient masking: 3,892 to 5,570 tokens/s, bound by the host's CPU, so it moves with the
    machine) on three H100 machines and one H200; distilling from the dense teacher (the default where it
    is at hand): 9,008 to 9,847 tokens/s, 1.8x to 2.4x the guide;
    2 H200s: 1.87x to 1.92x one (1.905x at the median of three same-call pairs) under the default sharded
    step, 1.71x under DDP
  Disk, LLaMA-2-7B (bf16 weights and states): each checkpoint is 35.3 GB (13.5 GB of weights, 21.8 GB of
    optimizer state) and the fine-tuned model 13.5 GB; with the default of one kept checkpoint the output
    folder peaks at 70.6 GB (the newest checkpoint and the one being written), beside the 27 GB of the
    dense and pruned models. The banner shows the plan; a run that cannot fit stops before loading
    (--save_strategy no needs 13.5 GB). A checkpoint is written in the background: at the 7B shape on one
    H100 it costs training 0.75 s at most (35.3 GB; about 35 s when written in place)
  LLaMA-2-7B, the guide's estimates on A100 80GB (not measured here):
  1 GPU: ~24-36 hours
  2 GPUs: ~14-20 hours (1.7x speedup)
  4 GPUs: ~8-12 hours (2.5-3x speedup)
EOF
}

# How the user ran this script: errors point to its --help, and so do the Python parser's (SPARSE_ADAMW_PROG).
PROG="bash $(printf '%q' "$0")"

die() {
    echo "Error: $* (see ${PROG} --help)" >&2
    exit 2
}

NUM_GPUS=""
GPU_IDS=""
YES=0
DRY_RUN=0
NNODES=1
NODE_RANK=0
MASTER_ADDR=""
MASTER_PORT=29500
RDZV_ENDPOINT=""
PASS_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --num_gpus) [[ $# -ge 2 ]] || die "--num_gpus needs a value"; NUM_GPUS="$2"; shift 2 ;;
        --num_gpus=*) NUM_GPUS="${1#*=}"; shift ;;
        --gpu_ids) [[ $# -ge 2 ]] || die "--gpu_ids needs a value"; GPU_IDS="$2"; shift 2 ;;
        --gpu_ids=*) GPU_IDS="${1#*=}"; shift ;;
        --nnodes|--node_rank|--master_addr|--master_port|--rdzv_endpoint)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            name="${1#--}"; printf -v "${name^^}" '%s' "$2"; shift 2 ;;
        --nnodes=*|--node_rank=*|--master_addr=*|--master_port=*|--rdzv_endpoint=*)
            name="${1%%=*}"; name="${name#--}"; printf -v "${name^^}" '%s' "${1#*=}"; shift ;;
        --yes|-y) YES=1; shift ;;
        --dry_run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) PASS_ARGS+=("$1"); shift ;;
    esac
done

# ------------------------------------------------------------------ the script's own flags, checked at once
# Before nvidia-smi, the environment and Python (seconds): a typo fails in milliseconds.
if [[ -n "$NUM_GPUS" && ! "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    die "--num_gpus must be a positive integer, got '${NUM_GPUS}'"
fi
GPU_IDS="${GPU_IDS// /}"
CHOSEN=()
if [[ -n "$GPU_IDS" ]]; then
    [[ "$GPU_IDS" =~ ^[0-9]+(,[0-9]+)*$ ]] \
        || die "--gpu_ids must be comma-separated GPU numbers such as \"2,3\", got '${GPU_IDS}'"
    IFS=',' read -r -a CHOSEN <<< "$GPU_IDS"
    if [[ -n "$NUM_GPUS" && "$NUM_GPUS" != "${#CHOSEN[@]}" ]]; then
        die "--num_gpus ${NUM_GPUS} but --gpu_ids \"${GPU_IDS}\" names ${#CHOSEN[@]} GPU(s)"
    fi
    declare -A SEEN=()
    for id in "${CHOSEN[@]}"; do
        [[ -z "${SEEN[$id]+x}" ]] || die "GPU ${id} is listed twice in --gpu_ids"
        SEEN[$id]=1
    done
fi

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '${NNODES}'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) \
    || die "--node_rank must be 0 to $(( NNODES - 1 )) for --nnodes ${NNODES}, got '${NODE_RANK}'"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) \
    || die "--master_port must be a port number, got '${MASTER_PORT}'"
if (( NNODES > 1 )) && [[ -z "$MASTER_ADDR" && -z "$RDZV_ENDPOINT" ]]; then
    die "--nnodes ${NNODES} needs where the nodes meet: --master_addr HOST (node 0's address; with --node_rank on" \
        "each node) or --rdzv_endpoint HOST:PORT (c10d rendezvous)"
fi
[[ -z "$RDZV_ENDPOINT" || "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] \
    || die "--rdzv_endpoint must look like HOST:PORT, got '${RDZV_ENDPOINT}'"

# ------------------------------------------------------------------------------------------- which GPUs
declare -A FREE_MB=()
ALL_GPUS=()
NO_GPU_REASON=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
    NO_GPU_REASON="nvidia-smi is not on PATH"
elif ! SMI_OUT="$(nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits 2>/dev/null)"; then
    NO_GPU_REASON="nvidia-smi failed"
else
    while IFS=', ' read -r index free; do
        [[ "$index" =~ ^[0-9]+$ ]] || continue
        ALL_GPUS+=("$index")
        FREE_MB[$index]="$free"
    done <<< "$SMI_OUT"
    NO_GPU_REASON="nvidia-smi lists no GPU"
fi

CPU_MODE=0
if [[ ${#ALL_GPUS[@]} -eq 0 ]]; then
    # The CPU is the default without GPUs, never a fallback for GPUs that were asked for.
    if [[ -n "$NUM_GPUS" || -n "$GPU_IDS" ]]; then
        if [[ -n "$GPU_IDS" ]]; then asked="--gpu_ids ${GPU_IDS}"; else asked="--num_gpus ${NUM_GPUS}"; fi
        die "${asked} asks for ${NUM_GPUS:-${#CHOSEN[@]}} GPU(s), but no GPU is visible (${NO_GPU_REASON});" \
            "without --num_gpus and --gpu_ids the job runs on the CPU"
    fi
    CPU_MODE=1
    echo "No GPU found (${NO_GPU_REASON}): running on the CPU in one process$( (( NNODES > 1 )) && echo " per node")."
    NUM_GPUS=1
    NPROC=1
else
    if [[ -n "$GPU_IDS" ]]; then
        for id in "${CHOSEN[@]}"; do
            [[ -n "${FREE_MB[$id]+x}" ]] || die "GPU ${id} does not exist; nvidia-smi lists: ${ALL_GPUS[*]}"
        done
        NUM_GPUS="${#CHOSEN[@]}"
    else
        NUM_GPUS="${NUM_GPUS:-1}"
        VISIBLE=("${ALL_GPUS[@]}")
        if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
            IFS=',' read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
            for id in "${VISIBLE[@]}"; do
                [[ -n "${FREE_MB[$id]+x}" ]] \
                    || die "CUDA_VISIBLE_DEVICES names GPU ${id}, which nvidia-smi does not list (${ALL_GPUS[*]})"
            done
        fi
        if (( NUM_GPUS > ${#VISIBLE[@]} )); then
            die "--num_gpus ${NUM_GPUS} but only ${#VISIBLE[@]} GPU(s) are visible (${VISIBLE[*]})"
        fi
        CHOSEN=("${VISIBLE[@]:0:NUM_GPUS}")
        GPU_IDS="$(IFS=','; echo "${CHOSEN[*]}")"
    fi
    export CUDA_VISIBLE_DEVICES="$GPU_IDS"
    NPROC="$NUM_GPUS"
fi

# ------------------------------------------------------------------------------ the resolved configuration
# Sets $PYTHON (creating ./.venv with the offline model and corpus on first use) and HF_HUB_OFFLINE=1.
source "${SCRIPT_DIR}/scripts/setup_env.sh" pipeline
# The Python entry resolves every default (and the gradient accumulation) itself, and checks the other flags;
# the banner shows its answer. When it refuses, its error (on stderr) is the last thing printed: no banner.
# Gradient accumulation counts every process of every node.
# LOCAL_WORLD_SIZE: the processes on this node, as torchrun will set it (--data_parallel auto needs one host).
if ! CONFIG="$(SPARSE_ADAMW_PROG="$PROG" LOCAL_WORLD_SIZE="$NPROC" "$PYTHON" -m sparse_adamw.pipeline.finetune --print_config \
        --num_processes "$(( NPROC * NNODES ))" ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})"; then
    exit 2
fi
eval "$CONFIG"
# A run would stop at this (a missing --model, say): stop now, before the banner. --dry_run shows the plan anyway.
if [[ -n "${INPUT_ERROR:-}" && "$DRY_RUN" != 1 ]]; then
    echo "Error: ${INPUT_ERROR}" >&2
    echo "(see ${PROG} --help)" >&2
    exit 2
fi

if [[ "$CPU_MODE" == 1 ]]; then
    TRAINING_MODE="CPU, one process (no GPU found)"
elif [[ "$NPROC" == 1 ]]; then
    TRAINING_MODE="Single-GPU"
elif [[ "$FSDP" == 1 ]]; then
    TRAINING_MODE="Multi-GPU (torchrun, FSDP2: weights, gradients and optimizer state sharded)"
elif [[ "$DATA_PARALLEL" == sharded ]]; then
    TRAINING_MODE="Multi-GPU (torchrun, sharded step: each GPU steps its share of the parameters; gradients and weights travel by copy engine)"
else
    TRAINING_MODE="Multi-GPU (torchrun, DDP)"
fi

echo "=========================================="
echo "Dense Fine-tuning Configuration"
echo "=========================================="
echo "Method: Full fine-tuning with SparseTrainer (SparseAdamW, pruned blocks kept at zero)"
echo "Pruned model: ${MODEL}${MODEL_NOTE}"
echo "Output directory: ${OUTPUT_DIR}"
[[ -z "$RESUME_FROM" ]] || echo "Resuming from: ${RESUME_FROM}"
echo "Dataset: ${DATASET}"
echo ""
echo "GPU Configuration:"
echo "  Number of GPUs: $([[ "$CPU_MODE" == 1 ]] && echo 0 || echo "$NUM_GPUS")"
echo "  GPU IDs: ${GPU_IDS:-none}"
echo "  Training mode: ${TRAINING_MODE}"
[[ -z "${DATA_PARALLEL_WHY:-}" || "$FSDP" == 1 ]] || echo "  Data parallel: ${DATA_PARALLEL_WHY}"
if (( NNODES > 1 )); then
    echo "  Nodes: ${NNODES} x ${NPROC} process(es) = $(( NNODES * NPROC )) in all; this is node ${NODE_RANK}," \
         "meeting at ${RDZV_ENDPOINT:-${MASTER_ADDR}:${MASTER_PORT}}$([[ -n "$RDZV_ENDPOINT" ]] && echo " (c10d)")"
fi
echo ""
echo "Training Parameters:"
echo "  Number of epochs: ${NUM_EPOCHS}"
[[ "$MAX_STEPS" -le 0 ]] || echo "  Max steps: ${MAX_STEPS} (stops before the epochs end)"
echo "  Learning rate: ${LEARNING_RATE}"
echo "  Per-device batch size: ${BATCH_SIZE}"
echo "  Gradient accumulation: ${GRADIENT_ACCUMULATION}"
echo "  Gradient checkpointing: ${CHECKPOINTING}"
echo "  Memory plan: ${MEMORY_PLAN}"
echo "  Liger-Kernel: ${LIGER}"
echo "  Effective batch size: ${EFFECTIVE_BATCH}"
echo "  Block size: ${BLOCK_SIZE}"
echo "  Max train samples: ${MAX_TRAIN_SAMPLES}"
echo "  Distillation: ${DISTILL}"
echo "  LoRA: ${LORA}"
echo "  Teacher's text: ${GENERATED}"
echo "  Out-of-domain eval: ${OOD}"
echo "  Precision: ${DTYPE} weights$([[ "$DTYPE" == bfloat16 ]] && echo " (stochastic rounding)")$([[ "$BF16" == 1 ]] && echo ", bf16 autocast"), ${STATE_DTYPE} optimizer states$([[ "$STATE_DTYPE" == bfloat16 ]] && echo " (exp_avg_sq rounded stochastically)")"
echo "  Disk: ${DISK_PLAN}"
echo "=========================================="
echo ""

if [[ "$CPU_MODE" == 0 && "$DEVICE" == cpu ]]; then
    echo "Warning: nvidia-smi lists GPUs but ${PYTHON}'s PyTorch cannot use CUDA: the training runs on the CPU."
fi

# --------------------------------------------------------------------------------- GPU memory check
if [[ "$CPU_MODE" == 0 ]]; then
    LOW=0
    for id in "${CHOSEN[@]}"; do
        free="${FREE_MB[$id]}"
        echo "Available GPU memory: GPU ${id}: ${free} MB (~$(( free / 1024 )) GB)"
        (( free >= MIN_GPU_MEMORY_GB * 1024 )) || LOW=1
    done
    if [[ "$LOW" == 1 ]]; then
        echo ""
        echo "⚠️  Warning: GPU memory may be insufficient! (less than ${MIN_GPU_MEMORY_GB} GB free)"
        echo "Consider --gradient_checkpointing, more GPUs, or GPUs with more free memory."
        if [[ "$YES" == 1 ]]; then
            echo "Continue anyway? (y/n) y (--yes)"
        elif [[ -t 0 ]]; then
            read -r -p "Continue anyway? (y/n) " answer
            [[ "$answer" =~ ^[Yy] ]] || { echo "Aborted."; exit 1; }
        else
            echo "Continue anyway? (y/n) -- no terminal to ask: stopping. Pass --yes to continue anyway." >&2
            exit 1
        fi
    fi
    echo ""
fi

# ----------------------------------------------------------------------------------------------- launch
# Gradient accumulation is the Python side's to set: it counts every process (WORLD_SIZE), or follows the memory plan.
ENTRY=(-m sparse_adamw.pipeline.finetune)
if (( NNODES > 1 )) && [[ -n "$RDZV_ENDPOINT" ]]; then
    NODES=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id sparse_adamw)
elif (( NNODES > 1 )); then
    NODES=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
    NODES=(--standalone)
fi
if [[ "$NPROC" == 1 && "$NNODES" == 1 ]]; then
    CMD=("$PYTHON" "${ENTRY[@]}" ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
else
    # torchrun, run by the same interpreter (a torchrun on PATH may belong to another environment).
    CMD=("$PYTHON" -m torch.distributed.run "${NODES[@]}" --nproc_per_node "$NPROC" "${ENTRY[@]}"
         ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
fi

echo "🚀 Starting dense fine-tuning with SparseTrainer..."
if [[ "$CPU_MODE" == 1 ]]; then
    echo "Training mode: CPU, 1 process"
else
    echo "Training mode: ${NUM_GPUS} GPU(s) on device(s): ${GPU_IDS}"
fi
echo "Effective batch size: ${EFFECTIVE_BATCH}"
echo "=========================================="
if (( NNODES > 1 )); then
    echo "Using ${NNODES} nodes with torchrun (this is node ${NODE_RANK}; ${NPROC} process(es) here)..."
elif [[ "$NPROC" == 1 ]]; then
    echo "Using single-process training ($([[ "$CPU_MODE" == 1 ]] && echo CPU || echo "GPU ${GPU_IDS}"))..."
else
    echo "Using multi-GPU training with torchrun (${NPROC} GPUs, $([[ "$FSDP" == 1 ]] && echo FSDP2 || { [[ "$DATA_PARALLEL" == sharded ]] && echo "sharded step" || echo DDP; }))..."
fi
echo "Command: $(printf '%q ' "${CMD[@]}")"

if [[ "$DRY_RUN" == 1 ]]; then
    echo "(dry run: not started)"
    exit 0
fi
exec "${CMD[@]}"
