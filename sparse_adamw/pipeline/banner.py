"""The banner run_dense_finetune.sh prints before a fine-tune: the resolved plan as shell-quoted KEY=VALUE lines
(`python -m sparse_adamw.pipeline.finetune --print_config`), with what a run would stop at."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Dict

from .cli import default_pruned_model
from .disk_plan import describe_disk_plan
from .finetune_config import FinetuneArguments, Plan, check_inputs, describe_dataset, format_lr
from .memory_plan import CHECKPOINTING_ARGS
from .teacher_text import TEXT_FILE


def input_error(args: FinetuneArguments) -> str:
    """What check_inputs would stop a run at ("" when nothing): --print_config reports it rather than failing."""
    try:
        check_inputs(args)
    except ValueError as err:
        return str(err)
    return ""


def liger_note(training: Dict[str, object], on_cpu: bool) -> str:
    """What the run will do about Liger-Kernel, for the banner."""
    import importlib.metadata

    if on_cpu or training.get("use_liger_kernel") is False:
        return "off" + (" (CPU)" if on_cpu else "")
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "off (liger-kernel is not installed: pip install 'sparse_adamw[gpu]')"
    return f"on where liger-kernel {version} supports the model type"


def generated_note(plan: Plan) -> str:
    """The banner's line on the teacher's text."""
    a = plan.args
    if a.generated_fraction > 0:
        joins = "in place of as many corpus blocks" if a.generated_mode == "replace" else "added to the corpus"
        return (f"{a.generated_fraction:g} of the training sequences written by the teacher before training, {joins} "
                f"(T={a.generated_temperature:g}, top-k {a.generated_top_k or 'off'}, from the first "
                f"{a.generated_prompt_tokens} tokens of corpus blocks), kept in "
                f"{Path(plan.training['output_dir']) / TEXT_FILE}")
    return "off" + ("" if a.distill else " (no teacher)")


def print_config(plan: Plan) -> None:
    """Shell-quoted KEY=VALUE lines for run_dense_finetune.sh."""
    t, a = plan.training, plan.args
    error = input_error(a)
    values = {
        "MODEL": a.model,
        "MODEL_NOTE": "" if plan.model_exists else (
            " (not there yet: the prune step makes it first)" if a.model == str(default_pruned_model())
            else " (not found here)"),
        "OUTPUT_DIR": t["output_dir"],
        "DATASET": describe_dataset(a.dataset, a.dataset_path),
        "DEVICE": "cpu" if plan.on_cpu else "cuda",
        "CPU_DEFAULT": int(plan.cpu_default),
        "NUM_EPOCHS": f"{t['num_train_epochs']:g}",
        "MAX_STEPS": t["max_steps"],
        "LEARNING_RATE": format_lr(t["learning_rate"]),
        "BATCH_SIZE": t["per_device_train_batch_size"] if plan.given["per_device_train_batch_size"] or not
        plan.memory_plan else "auto",
        "GRADIENT_ACCUMULATION": "auto" if plan.memory_plan else t["gradient_accumulation_steps"],
        "CHECKPOINTING": ("auto" if plan.given["gradient_checkpointing"] is None and plan.memory_plan
                          else "on" if any(t.get(k) for k in CHECKPOINTING_ARGS) else "off"),
        "MEMORY_PLAN": ("measured on the GPU at the start: the fastest micro-batch and checkpointing that fit "
                        + (f"{a.max_memory_gb:g} GiB" if a.max_memory_gb else "the free memory") + ", less 5%"
                        if plan.memory_plan else "off (given on the command line)" if not plan.on_cpu else "off (CPU)"),
        "LIGER": liger_note(t, plan.on_cpu),
        "EFFECTIVE_BATCH": plan.effective_batch_size,
        "BLOCK_SIZE": a.block_size,
        "MAX_TRAIN_SAMPLES": a.max_train_samples or "all",
        "BF16": int(bool(t["bf16"])),
        "DTYPE": a.dtype,
        "STATE_DTYPE": a.state_dtype,
        "FSDP": int(bool(t.get("fsdp"))),
        "DATA_PARALLEL": a.data_parallel,
        "DATA_PARALLEL_WHY": plan.data_parallel_why,
        "DISTILL": (f"alpha {a.distill_alpha:g} (KL to the dense model, T={a.distill_temperature:g}"
                    + (f", SquareHead {a.distill_hidden_weight:g}" if a.distill_hidden_weight else "")
                    + f"), teacher {a.teacher}") if a.distill else (
                        "off (--no_distill)" if a.no_distill else "off (no dense teacher at hand: --teacher DIR)"),
        "GENERATED": generated_note(plan),
        "LORA": (f"masked LoRA, {plan.lora.describe()}; the pruned weights frozen" if plan.lora else
                 "off (every weight trains)"),
        "OOD": (f"{a.ood_windows} windows x {a.block_size} tokens of held-out novels, plays, speeches and recipes"
                if a.ood_windows and not a.skip_eval else "off"),
        "DISK_PLAN": describe_disk_plan(plan) if not error else "not estimated",
        "RESUME_FROM": plan.resume_from or "",
        "RUN_STATE": "complete" if plan.status.complete else "resume" if plan.resume_from else "new",
        "INPUT_ERROR": error,  # what a run (not --print_config) would stop at, before the banner
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")
