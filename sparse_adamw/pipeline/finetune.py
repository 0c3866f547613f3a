"""Full fine-tuning of a block-pruned causal LM with SparseAdamW; `python -m sparse_adamw.pipeline.finetune --help`.
(Its flags, defaults and their resolution: finetune_config.py; this module runs the job; the measurements before
and after training: finetune_eval.py; how it ends, the final model written whole: final_model.py.)

Every Linear weight's pruned 16x16 blocks stay exactly zero: SparseTrainer derives the block masks from the
model once (or reads the prune step's block_masks.pt and checks it against the model), SparseAdamW never touches
those blocks, and they are checked again after a resume, at every checkpoint and at the end.

Defaults follow the user's guide: sequence length 1024, 30000 training sequences at most, 3 epochs, learning rate
5e-5, effective batch 8 (micro-batch x processes x gradient accumulation), logs every 10 steps (`Step 10:
loss=2.5432`). On GPUs that support bf16: bf16 weights (SparseAdamW rounds them stochastically, so small updates
are not lost) and bf16 autocast; fp32 on the CPU. On GPUs the micro-batch and gradient checkpointing are measured
at the start (memory_plan.py) unless given, and Liger-Kernel is used where installed. Where the dense model the
pruned one came from is at hand (prune_report.json names it), the loss distils from it (distill.py; --no_distill
turns it off). With no --model, the model is the offline default: SmolLM2-135M pruned by `python -m
sparse_adamw.pipeline.prune` (run first when its output is missing), trained at its own measured learning rate,
5e-4. On a CPU that default job is resized to finish in minutes (docs/design.md, "The offline default"): 40 steps
of 4 sequences of 256 tokens, perplexity on 16 windows of 256 tokens.

Under torchrun the ranks share the work as --data_parallel says (parallel_mode.py: by default the sharded step on
GPUs of one host that reach each other's memory, else DDP); --fsdp shards the weights, gradients and SparseAdamW's
state over the GPUs with FSDP2 instead (accelerate's fully_shard through the Trainer; GPUs only). Either way the checkpoint's
optimizer.pt has the one-process format, so a run can resume on another number of GPUs.

The run keeps its resolved configuration and a fingerprint of its starting weights and masks in --output_dir
(run_config.json, see run_folder.py). Rerunning the same command resumes from the last usable checkpoint there
(a damaged one is named and skipped); a rerun that differs in anything that changes the result is refused before
anything is loaded, naming each difference; a larger --max_steps or --num_train_epochs trains on; a rerun of a
complete run says so and changes nothing; --overwrite_output_dir starts afresh. The first Ctrl+C saves a checkpoint
at the end of the current step and exits with status 130; a second one aborts without saving; one in any other
phase exits 130 too, leaving every file whole or absent. The result, in --output_dir: the model in safetensors with
its tokenizer, trainer_state.json, block_masks.pt, run_config.json and finetune_report.json (perplexity and
sparsity before and after: check_sparsity's exact zeros, and the fraction of weights in pruned blocks, which cannot
change). Once the run is complete its checkpoints are deleted (--keep_checkpoints keeps the last one, to train
longer later).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..masks import MASKS_FILE, normalize_block_size
from ..sparsity import SparsityViolation, check_sparsity, pruned_fraction
from .callbacks import LogAtCheckpoints, StepClock
from .cli import LOAD_ERRORS, default_pruned_model, timed, versions
from . import final_model, finetune_eval, held_out, lora, results, teacher_text
from .data import DEFAULT_DATASET
from .banner import print_config
from .disk_plan import disk_plan, disk_refusal
from .finetune_config import (
    FinetuneArguments,
    FinetuneTrainingArguments,
    Plan,
    data_parallel,
    describe_dataset,
    distill_config,
    format_lr,
    parse_arguments,
    text_settings,
)
from .memory_plan import checkpointing_asked, say_out_of_memory
from .models import DEFAULT_MODEL, liger_supports
from .run_folder import (
    RECORD_FORMAT,
    REPORT_FILE,
    RUN_CONFIG,
    WAYS_OUT,
    RunFolderError,
    clear_leftovers,
    clear_run,
    fingerprint,
    fingerprint_differences,
    folder_size,
    format_size,
    newest_checkpoint,
    read_json,
    remove_checkpoints,
    weight_files,
    write_json,
)

EXIT_INTERRUPTED = 130  # the shell's code for a job stopped by SIGINT
EXIT_FAILED = 1  # out of GPU memory mid-run, or the final model could not be written: a rerun resumes
# A model with at least this fraction of exact zeros in its decoder Linear weights is a pruned one (a quantized
# but unpruned checkpoint has a few hundredths of a percent): if none of its blocks is all zero, it was pruned in
# another block shape.
PRUNED_ZEROS = 0.01
PAUSE_ENV = "SPARSE_ADAMW_TEST_PAUSE"  # tests: stop at a named point until a signal comes


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


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _pause_here(point: str) -> None:
    """Tests: with SPARSE_ADAMW_TEST_PAUSE=<point>, stop here until a signal ends the process."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"[{PAUSE_ENV}] paused at {point}", flush=True)
        while True:
            time.sleep(0.05)


@dataclass
class _Job:
    """What the steps of run() hand on to each other."""

    plan: Plan
    training_args: FinetuneTrainingArguments
    timings: Dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    phase: str = "starting"  # what an interruption interrupts
    prune_block: Optional[Tuple[int, int]] = None  # --prune_block, checked by _load
    fingerprint: Optional[Dict[str, Any]] = None  # of the starting weights and masks, in run_config.json
    model: Any = None  # before training; the Trainer may wrap or shard it
    teacher: Any = None  # the dense model, with distillation
    memory: Any = None  # the MemoryPlan measured on GPUs
    training_peak: Optional[int] = None  # GPUs: the most memory the allocator reserved while training
    disk: Any = None  # the DiskPlan checked before loading
    clock: Any = None  # StepClock
    tokenizer: Any = None
    train: Optional[torch.Tensor] = None
    windows: Optional[torch.Tensor] = None  # on the main process, unless --skip_eval
    evaluated: Optional[str] = None
    held_out: Optional[Dict[str, torch.Tensor]] = None  # held_out.py's windows by kind (main process)
    held_out_note: str = "off"  # what they are, or why there are none
    teacher_text: Optional[Dict[str, Any]] = None  # how the teacher's share of the training text was made
    trainer: Any = None
    result: Any = None  # the Trainer's TrainOutput
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)  # after training: the optimizer's; --lora: the
    # frozen weights', from the start (lora.pruned_masks), in blocks of lora_block
    lora_block: Optional[Tuple[int, int]] = None
    # "before" and "after" training, as the report keeps them
    perplexity: Dict[str, Optional[float]] = field(default_factory=lambda: {"before": None, "after": None,
                                                                             "dense": None})
    # the same on the held-out text: {"before": {"all": ..., kind: ...}, ...}
    held_out_perplexity: Dict[str, Optional[Dict[str, float]]] = field(
        default_factory=lambda: {"before": None, "after": None, "dense": None})
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

    def enter(self, phase: str, pause: Optional[str] = None) -> None:
        self.phase = phase
        if pause:
            _pause_here(pause)


def _start(plan: Plan) -> Optional[_Job]:
    """Training arguments, seed, the offline default's pruned model, and the output folder made ready: afresh with
    --overwrite_output_dir, else without what an interrupted run left half-written. None when torchrun's processes
    did not come up as one distributed run."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    training_args = FinetuneTrainingArguments(**plan.training)
    if plan.world_size > 1 and training_args.parallel_mode.value != "distributed":
        print(f"error: WORLD_SIZE={plan.world_size} but the Trainer did not set up distributed training "
              f"(parallel mode {training_args.parallel_mode.value})", file=sys.stderr)
        return None
    if training_args.n_gpu > 1:
        # One process trains on one GPU: the Trainer would otherwise wrap the model in nn.DataParallel, which
        # SparseTrainer's masks, the memory plan and the checkpoints do not support. Several GPUs: torchrun.
        print(f"note: {training_args.n_gpu} GPUs are visible to this one process: training on {training_args.device} "
              "only (run_dense_finetune.sh --num_gpus N uses N through torchrun)", file=sys.stderr)
        training_args._n_gpu = 1
    set_seed(training_args.seed)
    if training_args.disable_tqdm:
        hf_logging.disable_progress_bar()  # the "Loading weights" / "Writing model shards" bars
    job = _Job(plan, training_args)
    if plan.cpu_default:
        job.say(f"On the CPU with no --model: the CPU-sized offline default, {training_args.max_steps} steps of "
                f"{plan.effective_batch_size} x {job.args.block_size} tokens at learning rate "
                f"{format_lr(training_args.learning_rate)}")
    if job.args.model == str(default_pruned_model()):
        job.enter("pruning the model")
        with timed(job.timings, "prune_s"):
            _ensure_pruned_model(plan, training_args)
    if job.main and job.output_dir.is_dir():
        if job.args.overwrite_output_dir:
            clear_run(job.output_dir)
        clear_leftovers(job.output_dir)
        for path, problem in plan.status.broken:
            print(f"note: skipping the damaged checkpoint {path}: {problem} (deleted; the run goes on from "
                  f"{plan.resume_from or 'the start'})", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
    _barrier(training_args)
    return job


def _fingerprint(plan: Plan) -> Dict[str, Optional[Dict[str, Any]]]:
    """sha256 of the starting weights (and config) and of the masks file; files unchanged in size and time since
    run_config.json recorded them keep their recorded hash unread."""
    from .models import default_model_path

    args = plan.args
    known = ((plan.status.record or {}).get("fingerprint")) or {}
    model = default_model_path() if args.model == DEFAULT_MODEL else args.model
    masks = [Path(args.masks_file)] if args.masks_file and Path(args.masks_file).is_file() else []
    return {"weights": fingerprint(weight_files(model), known.get("weights")),
            "masks": fingerprint(masks, known.get("masks"))}


def _check_fingerprint(plan: Plan, current: Dict[str, Any]) -> None:
    """Refuse to go on from a run (its checkpoint or its result) that started from other weights or masks."""
    lines = fingerprint_differences((plan.status.record or {}).get("fingerprint") or {}, current)
    if lines:
        raise RunFolderError(
            f"{plan.training['output_dir']} holds a run that started from other weights or masks than "
            f"{plan.args.model}{' and ' + plan.args.masks_file if plan.args.masks_file else ''} hold now "
            f"(recorded -> now):\n" + "\n".join(lines) + f"\nTo start from these, {WAYS_OUT}.")


def _record(job: _Job, **completed) -> Dict[str, Any]:
    plan, t = job.plan, job.training_args
    return {"format": RECORD_FORMAT, "config": plan.config, "schedule": plan.schedule,
            "fingerprint": job.fingerprint, "completed_steps": None, "completed_max_steps": None, **completed,
            "processes": {"world_size": plan.world_size, "per_device_train_batch_size": t.per_device_train_batch_size,
                          "gradient_accumulation_steps": t.gradient_accumulation_steps,
                          "data_parallel": data_parallel(plan)},
            "versions": versions()}


def _record_start(job: _Job) -> None:
    """Fingerprint the starting point, refuse to resume a run that started elsewhere, and write run_config.json
    (main process) before anything trains."""
    job.fingerprint = _fingerprint(job.plan)
    if job.plan.resume_from:
        _check_fingerprint(job.plan, job.fingerprint)
    if job.main:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(job.output_dir / RUN_CONFIG, _record(job))
    _barrier(job.training_args)


def _load(job: _Job) -> None:
    """The model (on the CPU: the Trainer places it), the train sequences and, on the main process, the eval
    windows."""
    from .data import load_eval_windows, train_blocks
    from .models import load_model

    args = job.args
    job.prune_block = normalize_block_size(args.prune_block)
    with timed(job.timings, "load_s"):
        job.model, job.tokenizer = load_model(args.model, "cpu", args.dtype)
    job.train = train_blocks(job.tokenizer, args.dataset or DEFAULT_DATASET, args.dataset_path, args.block_size,
                             args.max_train_samples or None)
    if job.main and not args.skip_eval:
        job.windows, job.evaluated = load_eval_windows(job.tokenizer, args.dataset, args.dataset_path,
                                                       args.block_size, args.max_eval_windows or None)
        job.held_out, job.held_out_note = held_out.load_or_note(job.tokenizer, args.block_size, args.ood_windows)
    job.model.config.use_cache = False
    job.model.train()
    if args.distill:
        # bf16 on GPUs (half the memory of fp32; it only runs forward), the student's dtype on the CPU.
        with timed(job.timings, "load_teacher_s"):
            job.teacher, _ = load_model(args.teacher, "cpu", args.dtype if job.plan.on_cpu else "bfloat16")
    if job.plan.lora is not None:
        lora.prepare_job(job)


def _write_teacher_text(job: _Job) -> None:
    """Put the teacher's share of the training text (--generated_fraction) into the training blocks: the text it
    writes, or wrote before under the same key (teacher_text.py). With --generated_mode add, a schedule in epochs
    is shortened to the corpus's number of steps."""
    from .models import default_model_path

    args, t = job.args, job.training_args
    settings = text_settings(args)
    if settings.fraction == 0:
        return
    teacher = str(default_model_path()) if args.teacher == DEFAULT_MODEL else os.path.abspath(args.teacher)
    corpus = len(job.train)
    with timed(job.timings, "teacher_text_s"):
        job.train, job.teacher_text = teacher_text.teacher_share(
            job.train, job.teacher, teacher_path=teacher, settings=settings, seed=t.seed,
            output_dir=job.output_dir, device=t.device, max_memory_gb=args.max_memory_gb, rank=t.process_index,
            world_size=job.plan.world_size, say=job.say)
    if len(job.train) > corpus and t.max_steps <= 0:
        # the Trainer counts steps from the epochs and the data's length: this many passes over the mix take as
        # many steps as --num_train_epochs over the corpus would
        t.num_train_epochs *= corpus / len(job.train)
        job.say(f"Teacher's text: the schedule keeps the corpus's steps, {t.num_train_epochs:.3g} passes over the "
                f"{len(job.train):,} sequences")
    if job.plan.training.get("fsdp"):
        job.teacher.to("cpu")  # FSDP2 shards it from there, as it does the student


DATA_PARALLEL_NOTES = {
    "sharded": "sharded step (ShardedSparseAdamW): each GPU steps the parameters it owns; gradients and weights "
               "travel by copy engine",
    "ddp": "DDP: every process steps the whole model on all-reduced gradients",
}


def _make_trainer(job: _Job) -> None:
    """SparseTrainer, which derives the block masks (or checks --masks_file) here, once."""
    from transformers import PrinterCallback, default_data_collator

    from .trainer import SparseTrainer, StepLogCallback

    args = job.args
    if job.training_args.use_liger_kernel is None:  # GPUs: on where liger-kernel is installed and fits the model
        job.training_args.use_liger_kernel = liger_supports(job.model)
    job.trainer = SparseTrainer(
        model=job.model, args=job.training_args, train_dataset=TokenBlocks(job.train),
        data_collator=default_data_collator, processing_class=job.tokenizer,
        # --lora: the optimizer steps the adapters only, with no masks; the frozen weights' are job.masks
        masks={} if job.plan.lora else None, masks_file=None if job.plan.lora else args.masks_file,
        block_size=job.lora_block or job.prune_block, optimizer_impl=args.optimizer_impl, state_dtype=args.state_dtype,
        teacher=job.teacher, distill=distill_config(args),
        data_parallel=args.data_parallel,  # resolved: "sharded" or "ddp"
        checkpoint_at_end=args.keep_checkpoints,  # else the end writes the fine-tuned model only
        frozen_in_checkpoints=job.plan.lora is None,  # --lora: its checkpoints hold the adapters only
    )
    job.trainer.remove_callback(PrinterCallback)
    job.trainer.add_callback(StepLogCallback())
    job.trainer.add_callback(LogAtCheckpoints())
    job.clock = StepClock()
    job.trainer.add_callback(job.clock)
    if job.teacher is not None:
        d = job.trainer.distill
        job.say(f"Distillation: {d.alpha:g} x KL(teacher || student) at T={d.temperature:g} + {1 - d.alpha:g} x LM "
                f"loss{f' + {d.hidden_weight:g} x SquareHead' if d.hidden_weight else ''}; teacher {args.teacher}")
    if job.plan.world_size > 1 and not job.trainer.fsdp_version:
        job.say(f"Data parallel: {DATA_PARALLEL_NOTES[args.data_parallel]} ({job.plan.world_size} processes; "
                f"{job.plan.data_parallel_why})")
    if job.training_args.use_liger_kernel:
        job.say(f"Liger-Kernel: fused RMSNorm, SwiGLU, RoPE and linear cross-entropy ({job.model.config.model_type})")
    if job.plan.masks_found:
        bh, bw = job.trainer.block_size
        job.say(f"Block masks: {args.masks_file} (the prune step's, {len(_frozen_masks(job))} weights in {bh}x{bw} "
                "blocks)")


def _frozen_masks(job: _Job) -> Dict[str, torch.Tensor]:
    """The pruned weights' masks: the trainer's, or with --lora the frozen model's (job.masks)."""
    return job.masks if job.plan.lora is not None else job.trainer.masks


def _plan_memory(job: _Job) -> None:
    """GPUs: measure the micro-batch and checkpointing that train fastest within the memory (memory_plan.py)."""
    from .memory_plan import apply_plan, plan_trainer

    given = job.plan.given
    per_process = job.plan.effective_batch_size // job.plan.world_size
    job.say(f"Measuring the memory plan: forward and backward at each candidate micro-batch (of {per_process} "
            "sequences per process and step)...", flush=True)
    with timed(job.timings, "memory_plan_s"):
        job.memory = plan_trainer(job.trainer, seq_len=job.args.block_size, per_process=per_process,
                                  world_size=job.plan.world_size, max_memory_gb=job.args.max_memory_gb,
                                  micro_batch=given["per_device_train_batch_size"],
                                  checkpointing=given["gradient_checkpointing"])
    apply_plan(job.trainer, job.memory)
    job.say(job.memory.describe() + f" ({job.timings['memory_plan_s']:.1f} s)")


def _check_masks_found(job: _Job) -> None:
    """A pruned model whose zeros form no whole block of the asked shape was pruned in another shape: its pruned
    weights would quietly train. Refused (ValueError)."""
    if "before" not in job.sparsity:  # --lora measured it before sharing the teacher's weights
        job.sparsity["before"] = check_sparsity(job.model, verbose=False)
    if job.args.masks_file is None and not _frozen_masks(job) and job.sparsity["before"] >= PRUNED_ZEROS:
        bh, bw = job.trainer.block_size
        raise ValueError(
            f"{job.args.model}: {job.sparsity['before']:.2%} of its decoder Linear weights are exactly zero, but not "
            f"one {bh}x{bw} block of them is all zero: was it pruned in another block shape? Pass the prune step's "
            f"--prune_block, or its {MASKS_FILE} with --masks_file")


def _announce(job: _Job) -> None:
    """The sparsity before training (exact zeros; pruned blocks from the trainer's masks) and the run's setup."""
    args, t, model = job.args, job.training_args, job.model
    if "before" not in job.pruned_blocks:  # --lora measured it before wrapping the weights
        job.pruned_blocks["before"] = pruned_fraction(model, job.trainer.masks, job.trainer.block_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    job.say("*** Starting masked LoRA fine-tuning ***" if job.plan.lora else "*** Starting sparse full fine-tuning ***")
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


def _train(job: _Job) -> Optional[int]:
    """Train (resuming from the last checkpoint); an exit status when it stopped early: Ctrl+C (after a
    checkpoint) or out of GPU memory."""
    trainer, resume_from = job.trainer, job.plan.resume_from
    if resume_from:
        job.say(f"Resuming from {resume_from}")
    job.say("", flush=True)
    cuda = torch.cuda.is_available() and not job.plan.on_cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats(job.training_args.device)
    try:
        with timed(job.timings, "train_s"):
            job.result = trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        say_out_of_memory(job)
        return EXIT_FAILED
    finally:
        if cuda:
            job.training_peak = torch.cuda.max_memory_reserved(job.training_args.device)
    if trainer.interrupted:
        step = trainer.state.global_step
        checkpoint = job.output_dir / f"checkpoint-{step}"
        job.say(f"\nInterrupted at step {step}: " + (f"checkpoint saved in {checkpoint}" if checkpoint.is_dir() else
                f"its checkpoint could not be written; the newest is {newest_checkpoint(job.output_dir) or 'none'}")
                + ". Rerun the same command to resume.")
        return EXIT_INTERRUPTED
    if job.plan.lora is not None:
        return None  # job.masks: the frozen weights', which the merge is checked against
    job.masks = trainer.optimizer_masks()  # after a resume, the checkpoint's
    job.say(f"Masks checked: {len(job.masks)} weights still have exactly zero pruned blocks")
    return None


def _finish(job: _Job) -> None:
    """Results, report, the run marked complete in run_config.json, then the checkpoints deleted (main process)."""
    runtime, tokens_per_s = results.throughput(job)
    results.print_results(job, runtime, tokens_per_s)
    _pause_here("report")
    results.write_report(job, tokens_per_s)
    state = job.trainer.state
    write_json(job.output_dir / RUN_CONFIG, _record(job, completed_steps=state.global_step,
                                                    completed_max_steps=state.max_steps))
    job.enter("deleting the checkpoints", "cleanup")
    kept = remove_checkpoints(job.output_dir, keep_last=job.args.keep_checkpoints)
    print(f"Output folder: {job.output_dir}, {format_size(folder_size(job.output_dir))} on disk ("
          + (f"kept {kept[0].name}, to train longer with a larger --max_steps)" if kept else
             "checkpoints deleted; --keep_checkpoints keeps the last one, to train longer later)"))


def _error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _interrupted(phase: str, err: BaseException) -> int:
    """One line, status 130. A second Ctrl+C in training ends it with SparseTrainer's own line (its str)."""
    if _is_main_process():
        what = str(err) or f"Interrupted while {phase}"
        print(f"\n{what}; rerun the same command to resume", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (what batch schedulers send before they kill) ends any phase as Ctrl+C does; in training,
    SparseTrainer's own handler takes over and puts this one back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(job: _Job, record: bool = True) -> Optional[int]:
    """Record the run (unless not `record`), load, make the trainer, measure the memory plan: an exit status when the
    user's input is wrong, else None."""
    try:
        if record:
            job.enter("checking the starting weights")
            _record_start(job)
        job.enter("loading the model and data", "load")
        _load(job)
        if record and not job.plan.status.trained:  # --plan_only and a run with every step done train nothing
            job.enter("writing the teacher's text")
            _write_teacher_text(job)
        _make_trainer(job)
        _check_masks_found(job)
        if job.plan.memory_plan:
            job.enter("measuring the memory plan")
            _plan_memory(job)
    except (*LOAD_ERRORS, SparsityViolation) as err:
        return _error(err)
    return None


def _check_disk(job: _Job) -> Optional[int]:
    """The disk plan (checkpoints.py), before anything loads: exit status 2 when the output folder's file system
    cannot hold the run, unless --skip_disk_check."""
    try:
        disk = disk_plan(job.plan)
    except (OSError, ValueError) as err:
        job.say(f"note: no disk plan ({err})")
        return None
    if disk is None:
        return None
    job.disk = disk
    job.say(f"Disk plan: {disk.describe()}")
    if disk.fits:
        return None
    t = job.training_args
    message = disk_refusal(disk, checkpoints=t.save_strategy != "no", state_dtype=torch.float32
                           if job.args.state_dtype == "float32" else torch.bfloat16, keep=t.save_total_limit)
    if job.args.skip_disk_check:
        job.say(f"warning: {message.split('. Lower it')[0]} (--skip_disk_check: starting anyway)")
        return None
    if job.main:
        print(f"error: {message}", file=sys.stderr)
    return 2


def _steps(job: _Job) -> int:
    failed = _check_disk(job)
    if failed is not None:
        return failed
    failed = _prepare(job)
    if failed is not None:
        return failed
    _announce(job)
    if job.windows is not None:
        job.enter("evaluating the pruned model", "eval_before")
        finetune_eval.before(job)
    job.enter("training")
    if job.plan.status.trained:
        final_model.adopt_checkpoint(job)
    else:
        stopped = _train(job)
        if stopped is not None:
            return stopped
    job.enter("saving the fine-tuned model")
    if not final_model.write(job, pause=_pause_here):
        return EXIT_FAILED
    _barrier(job.training_args)
    if not job.main:
        return 0
    job.enter("evaluating the fine-tuned model", "eval_after")
    finetune_eval.after(job)
    job.enter("writing the report")
    _finish(job)
    return 0


def run(plan: Plan) -> int:
    """The run, step by step; Ctrl+C in any phase exits 130 with one line (in training: see SparseTrainer)."""
    job = None
    try:
        job = _start(plan)
        return 2 if job is None else _steps(job)
    except KeyboardInterrupt as err:
        return _interrupted(job.phase if job is not None else "starting", err)


def plan_only(plan: Plan) -> int:
    """--plan_only: what the run would train with, measured as the run would measure it; nothing trained or written
    to the output folder."""
    import tempfile

    # What the Trainer writes on its own (on GPUs it makes its output folder) goes to a scratch folder.
    with tempfile.TemporaryDirectory(prefix="plan_only_") as scratch:
        plan.training["output_dir"] = scratch
        job = None
        try:
            job = _start(plan)
            if job is None:
                return 2
            failed = _prepare(job, record=False)
            if failed is not None:
                return failed
        except KeyboardInterrupt as err:
            return _interrupted(job.phase if job is not None else "starting", err)
    t = job.training_args
    why = ("measured above" if plan.memory_plan else "the CPU: no memory plan" if plan.on_cpu
           else "as given on the command line (no memory plan)")
    checkpointing = checkpointing_asked(t)
    job.say(f"Plan only ({why}): micro-batch {t.per_device_train_batch_size} x {plan.world_size} process(es) x "
            f"gradient accumulation {t.gradient_accumulation_steps} = effective batch {plan.effective_batch_size}, "
            f"checkpointing {'on' if checkpointing else 'off'}, Liger-Kernel {'on' if t.use_liger_kernel else 'off'}"
            "; nothing trained")
    return 0


def say_complete(plan: Plan) -> int:
    """A rerun of a complete run: say so, where the results are and what they were; change nothing."""
    try:
        if Path(plan.args.model).exists() or plan.args.model == DEFAULT_MODEL:
            _check_fingerprint(plan, _fingerprint(plan))
    except (RunFolderError, OSError) as err:
        return _error(err)
    if not _is_main_process():
        return 0
    out, record = Path(plan.training["output_dir"]), plan.status.record
    try:
        report = read_json(out / REPORT_FILE) or {}
    except ValueError:
        report = {}
    print(f"This run is already complete ({record['completed_steps']} steps): the fine-tuned model and "
          f"{REPORT_FILE} are in {out}")
    if report:
        print(results.summary_line(report))
    kept = newest_checkpoint(out)
    print("Nothing to do. " + (f"A larger --max_steps (or --num_train_epochs) trains on from {kept}; "
                               if kept else "It kept no checkpoint to train longer from (--keep_checkpoints keeps "
                               "one); ") + "--overwrite_output_dir starts afresh.")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        with _sigterm_as_ctrl_c():
            plan = parse_arguments(argv)
            if plan.args.print_config:
                print_config(plan)
                return 0
            if plan.args.plan_only:
                return plan_only(plan)
            return say_complete(plan) if plan.status.complete else run(plan)
    except KeyboardInterrupt as err:
        return _interrupted("starting", err)
    finally:
        # A rank that exits with its NCCL process group alive can crash in teardown (seen once under FSDP2 on
        # 2 GPUs: SIGSEGV on rank 1 after its last save, so torchrun killed rank 0 mid-evaluation).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
