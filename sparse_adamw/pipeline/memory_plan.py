"""The memory plan: the per-device micro-batch and gradient checkpointing that train fastest within the GPU's memory.

At the start of a GPU run with none of --per_device_train_batch_size, --gradient_checkpointing or
--gradient_accumulation_steps given, the fine-tune measures instead of guessing. With the real model (and the
teacher, when distilling) on the GPU, it holds the memory training will add later (SparseAdamW's compact state;
DDP's buckets hold the gradients themselves, see SparseTrainer) in a placeholder, then runs the real loss's forward
and backward twice at each candidate micro-batch, largest first, without and then with checkpointing, catching
out-of-memory errors. A candidate fits when its peak (memory reserved by PyTorch's allocator) stays within the
budget: the free memory (or --max_memory_gb) less a 5% margin. The fastest fitting candidate wins (tokens per second
of the second, timed pass). Without checkpointing, a larger micro-batch is never slower, so each mode stops at its
first fit; checkpointing is tried only at micro-batches larger than the best fit without it. The effective batch
stays the user's: gradient accumulation = effective batch / (micro-batch x processes). Under DDP every rank measures
and the ranks agree on the worst peak and the slowest time; under FSDP2 the trial runs on the whole model, which
only overstates the memory. Under the sharded step (ShardedSparseAdamW) a rank holds 1 / world of the optimizer
state and a landing buffer for (world - 1) / world of the gradients, in symmetric memory, outside PyTorch's allocator.
"""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .models import resolve_dtype
from .run_folder import newest_checkpoint

GiB = 1024 ** 3
MARGIN = 0.05  # of the budget, for what the trial does not see (allocator fragmentation over a long run)
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Candidate:
    micro_batch: int
    checkpointing: bool

    def __str__(self) -> str:
        return f"micro-batch {self.micro_batch}" + (" with checkpointing" if self.checkpointing else "")


@dataclass
class Trial:
    candidate: Candidate
    peak: Optional[int] = None  # bytes; None when it ran out of memory
    seconds: Optional[float] = None  # the timed forward and backward

    def tokens_per_s(self, seq_len: int) -> Optional[float]:
        return None if not self.seconds else self.candidate.micro_batch * seq_len / self.seconds


@dataclass
class MemoryPlan:
    chosen: Candidate
    gradient_accumulation_steps: int
    budget: int  # bytes
    reserved: Dict[str, int]  # bytes held for what the trial cannot run: {what: bytes}
    trials: List[Trial] = field(default_factory=list)
    seq_len: int = 0

    def describe(self) -> str:
        """What was tried and why the choice, a line each."""
        return "\n".join([f"Memory plan: {self.chosen}, gradient accumulation {self.gradient_accumulation_steps} "
                          f"({_setting(self.budget, self.reserved)})"]
                         + _trial_lines(self.trials, self.budget, self.seq_len, self.chosen))


def _setting(budget: int, reserved: Dict[str, int]) -> str:
    return f"budget {budget / GiB:.1f} GiB; held for later: " + ", ".join(
        f"{k} {v / GiB:.1f} GiB" for k, v in reserved.items())


def _trial_lines(trials: List[Trial], budget: int, seq_len: int, chosen: Optional[Candidate] = None) -> List[str]:
    lines = []
    for trial in trials:
        if trial.peak is None:
            what = "out of memory"
        else:
            fits = "fits" if trial.peak <= budget else "over budget"
            what = f"peak {trial.peak / GiB:.1f} GiB ({fits}), {trial.tokens_per_s(seq_len):,.0f} tokens/s"
        mark = " <- fastest that fits" if trial.candidate == chosen else ""
        lines.append(f"  tried {trial.candidate}: {what}{mark}")
    return lines


class NothingFits(RuntimeError):
    pass


def micro_batches(per_process: int, given: Optional[int] = None) -> List[int]:
    """Candidate micro-batches, largest first: divisors of the sequences each process takes per optimizer step."""
    if given is not None:
        return [given]
    return [b for b in range(min(per_process, MAX_MICRO_BATCH), 0, -1) if per_process % b == 0]


def _indexed(device) -> torch.device:
    device = torch.device(device)
    return device if device.index is not None else torch.device(device.type, torch.cuda.current_device())


def budget_bytes(device: torch.device, max_memory_gb: Optional[float]) -> int:
    """What the run may use: free memory plus what this process already holds, capped by max_memory_gb, less MARGIN."""
    device = _indexed(device)
    free, _ = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device)
    if max_memory_gb:
        available = min(available, int(max_memory_gb * GiB))
    return int(available * (1 - MARGIN))


def cap_memory(device: torch.device, max_memory_gb: float) -> None:
    """Make the allocator refuse more than max_memory_gb (a shared card, or an 80 GB card emulated on a larger one)."""
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gb * GiB / total), device)


def _agree(values: Sequence[float]) -> List[float]:
    """The largest value of each over all ranks (every rank then makes the same choice)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def _hold(nbytes: int, device: torch.device) -> Optional[torch.Tensor]:
    """The placeholder that holds `nbytes` on `device` through a trial (None for none): the memory training adds
    later (a seam for the tests, which watch it)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def measure(run: Callable[[Candidate], None], candidate: Candidate, device: torch.device, hold: int,
            clear: Callable[[], None]) -> Trial:
    """Peak memory and time of `run(candidate)` (forward and backward), run twice with `hold` bytes held."""
    trial = Trial(candidate)
    placeholder = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        placeholder = _hold(hold, device)
        run(candidate)  # the first pass also allocates the gradients, as the first micro-step does
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(candidate)
        torch.cuda.synchronize(device)
        trial.seconds = time.perf_counter() - start
        trial.peak = torch.cuda.max_memory_reserved(device)
    except torch.OutOfMemoryError:
        trial.peak = trial.seconds = None
    finally:
        del placeholder
        clear()
        gc.collect()
        torch.cuda.empty_cache()
    peak, seconds = _agree([_or_inf(trial.peak), _or_inf(trial.seconds)])
    trial.peak = None if peak == float("inf") else int(peak)
    trial.seconds = None if seconds == float("inf") else seconds
    return trial


def _or_inf(value: Optional[float]) -> float:
    return float("inf") if value is None else float(value)


def choose(run: Callable[[Candidate], None], *, per_process: int, seq_len: int,
           device: torch.device, budget: int, reserved: Dict[str, int], clear: Callable[[], None],
           micro_batch: Optional[int] = None, checkpointing: Optional[bool] = None) -> MemoryPlan:
    """Try the candidates (module docstring) and return the plan; NothingFits when none fits."""
    hold = sum(reserved.values())
    trials: List[Trial] = []
    best: Optional[Trial] = None
    for ckpt in ([checkpointing] if checkpointing is not None else [False, True]):
        for b in micro_batches(per_process, micro_batch):
            if best is not None and b <= best.candidate.micro_batch:
                break  # smaller (or checkpointed at no larger batch) is not faster
            trial = measure(run, Candidate(b, ckpt), device, hold, clear)
            trials.append(trial)
            if trial.peak is not None and trial.peak <= budget:
                if best is None or trial.seconds / b < best.seconds / best.candidate.micro_batch:
                    best = trial
                break
    if best is None:
        raise NothingFits("\n".join(
            [f"no micro-batch fits ({_setting(budget, reserved)}):"] + _trial_lines(trials, budget, seq_len)
            + ["Try --state_dtype bfloat16 (half the optimizer state), --fsdp over more GPUs, --no_distill, a shorter "
               "--block_size, or --max_memory_gb if the card has more free"]))
    return MemoryPlan(best.candidate, per_process // best.candidate.micro_batch, budget, reserved, trials, seq_len)


# ------------------------------------------------------------------------------------------- with a Trainer
def optimizer_state_bytes(model: torch.nn.Module, masks: Dict[str, torch.Tensor], block, state_dtype) -> int:
    """SparseAdamW's exp_avg and exp_avg_sq: the live blocks of masked weights, every element of the others."""
    itemsize = torch.empty((), dtype=state_dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            mask = masks.get(name)
            total += 2 * itemsize * (int(mask.sum()) * block[0] * block[1] if mask is not None else p.numel())
    return total


def held_for_later(model: torch.nn.Module, state_bytes: int, world_size: int, mode: str) -> Dict[str, int]:
    """What training adds beyond the trial's weights, gradients and activations, per rank: {what: bytes}.

    ddp (or one process): the whole optimizer state; DDP's all-reduce buckets need nothing, SparseTrainer makes the
    gradients views into them, so the trial's own gradients stand for them. fsdp: 1 / world of the state (the trial
    runs the whole model, which overstates the rest). sharded (ShardedSparseAdamW): the state of a rank's share, and
    a landing buffer for the other ranks' gradients of that share.
    """
    if mode == "fsdp":
        return {"optimizer state": state_bytes // world_size}
    if mode == "sharded":
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return {"optimizer state": -(-state_bytes // world_size),
                "landing buffer": -(-grads * (world_size - 1) // world_size)}
    return {"optimizer state": state_bytes}


def plan_trainer(trainer, *, seq_len: int, per_process: int, world_size: int, max_memory_gb: Optional[float] = None,
                 micro_batch: Optional[int] = None, checkpointing: Optional[bool] = None) -> MemoryPlan:
    """The plan for a SparseTrainer's run, measured with its model, loss (teacher included) and settings."""
    args, model = trainer.args, trainer.model
    device = args.device
    if max_memory_gb:
        cap_memory(device, max_memory_gb)
    model.to(device)  # FSDP2: the whole model (the Trainer shards it later), which overstates the memory
    state = optimizer_state_bytes(model, trainer.masks, trainer.block_size,
                                  resolve_dtype(trainer.state_dtype or torch.float32))
    mode = "fsdp" if trainer.fsdp_version else "sharded" if getattr(trainer, "sharded_step", False) else "ddp"
    reserved = held_for_later(model, state, world_size, mode)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator(device).manual_seed(0)  # the global RNG, and so the run, stays untouched
    kwargs = checkpointing_kwargs(args)

    def run(candidate: Candidate) -> None:
        set_checkpointing(model, candidate.checkpointing, kwargs)
        ids = torch.randint(vocab, (candidate.micro_batch, seq_len), device=device, generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()

    model.train()
    try:
        return choose(run, per_process=per_process, seq_len=seq_len, device=device,
                      budget=budget_bytes(device, max_memory_gb), reserved=reserved,
                      clear=lambda: model.zero_grad(set_to_none=True), micro_batch=micro_batch,
                      checkpointing=checkpointing)
    finally:
        set_checkpointing(model, False, kwargs)


def apply_plan(trainer, plan: MemoryPlan) -> None:
    """Set the chosen micro-batch, accumulation and checkpointing before train()."""
    args = trainer.args
    args.per_device_train_batch_size = plan.chosen.micro_batch
    args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    for name in CHECKPOINTING_ARGS:  # transformers 5.24 renamed it; the old name stays as an alias
        if hasattr(args, name):
            setattr(args, name, plan.chosen.checkpointing)
    trainer._train_batch_size = args.train_batch_size  # the Trainer caches it when it is made
    # Newer Trainers turn checkpointing on when they are made, older ones in train(): turn it on here for both.
    set_checkpointing(trainer.model, plan.chosen.checkpointing, checkpointing_kwargs(args))


CHECKPOINTING_ARGS = ("activation_checkpointing", "gradient_checkpointing")


def checkpointing_asked(args) -> bool:
    """Whether TrainingArguments `args` turn activation checkpointing on, under either of its names."""
    return any(getattr(args, k, False) for k in CHECKPOINTING_ARGS)


def checkpointing_kwargs(args) -> Optional[dict]:
    for name in CHECKPOINTING_ARGS:
        value = getattr(args, name + "_kwargs", None)
        if value is not None:
            return value
    return None


def checkpointing_on(model) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated, it warns) to is_activation_checkpointing
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def set_checkpointing(model, on: bool, kwargs: Optional[dict]) -> None:
    """Turn activation checkpointing on or off (the method names of transformers before and after 5.24)."""
    if on == checkpointing_on(model):
        return
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")(kwargs)
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


# -------------------------------------------------------------- out of memory in the middle of a run
def suggested_memory_gb(trial_peak: int, margin: float) -> int:
    """A --max_memory_gb under which the plan's chosen candidate no longer fits: its trial peak over the budget."""
    return max(1, math.floor(trial_peak / GiB / (1 - margin)) - 1)


def lower_plan_flag(*, trial_peak: Optional[int], margin: float, micro_batch: int, per_process: int,
                    checkpointing: bool) -> str:
    """The flag that lowers the plan: under the memory plan, a --max_memory_gb its choice no longer fits; else the
    next smaller micro-batch that divides the sequences a process takes per step, or checkpointing."""
    if trial_peak is not None:
        return f"--max_memory_gb {suggested_memory_gb(trial_peak, margin)}"
    if micro_batch > 1:
        return f"--per_device_train_batch_size {max(b for b in range(1, micro_batch) if per_process % b == 0)}"
    if not checkpointing:
        return "--gradient_checkpointing"
    return "--max_memory_gb (below the free memory) or more GPUs with --fsdp"


def out_of_memory_message(step: int, *, plan_text: str, trial_peak: Optional[int], run_peak: Optional[int],
                          flag: str, resume_from: Optional[str]) -> str:
    """One message: the step, the plan, the peaks, the flag that lowers the plan, and where a rerun resumes (the
    name of the newest checkpoint)."""
    peaks = []
    if trial_peak is not None:
        peaks.append(f"trial peak {trial_peak / GiB:.1f} GiB")
    if run_peak is not None:
        peaks.append(f"this run's peak {run_peak / GiB:.1f} GiB")
    where = f"resumes from {resume_from}" if resume_from else "starts again (no checkpoint was written yet)"
    return (f"out of GPU memory in step {step} (plan: {plan_text}" + (f"; {', '.join(peaks)}" if peaks else "")
            + f"). The same command with {flag} {where}, with a smaller plan")


def say_out_of_memory(job) -> None:
    """Out of memory mid-run: one message (main process) with the step, the plan, the peaks, and the flag that lowers
    the plan; the checkpoint being written is finished first, so that the rerun resumes from it. `job` is
    finetune.py's record of the run."""
    trainer, t = job.trainer, job.training_args
    trainer.checkpoint_writer.wait()
    micro, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    checkpointing = checkpointing_asked(t)
    plan_text = (f"micro-batch {micro} x gradient accumulation {accumulation}"
                 + (", activation checkpointing" if checkpointing else ""))
    trial_peak = None
    if job.memory is not None:
        trial_peak = next((trial.peak for trial in job.memory.trials if trial.candidate == job.memory.chosen), None)
        plan_text += f", measured at the start within {job.memory.budget / 1024 ** 3:.1f} GiB"
    flag = lower_plan_flag(trial_peak=trial_peak, margin=MARGIN, micro_batch=micro, checkpointing=checkpointing,
                           per_process=job.plan.effective_batch_size // job.plan.world_size)
    run_peak = torch.cuda.max_memory_reserved(t.device) if torch.cuda.is_available() and not job.plan.on_cpu else None
    if job.main:
        print("\nerror: " + out_of_memory_message(trainer.state.global_step + 1, plan_text=plan_text,
                                                   trial_peak=trial_peak, run_peak=run_peak, flag=flag,
                                                   resume_from=newest_checkpoint(job.output_dir)),
              file=sys.stderr, flush=True)
