"""What a finished fine-tune reports: the results table it prints, finetune_report.json, and the line a rerun of
the complete run prints from that report. (finetune.py runs the job; `job` here is its _Job.)"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import held_out, lora
from .cli import versions
from .finetune_config import data_parallel, describe_dataset
from .run_folder import REPORT_FILE, write_json


def whole_run_loss(log_history: List[Dict[str, Any]], after: int = 0) -> Optional[float]:
    """Mean training loss over the steps after `after` that the logged losses cover (each log is the mean since
    the one before)."""
    parts, last = [], after
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > last:
            parts.append(entry["loss"] * (entry["step"] - last))
            last = entry["step"]
    return math.fsum(parts) / (last - after) if last > after else None


def _table(rows: List[Tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([f"{r[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])])
                     for r in rows)


def recovered_fraction(perplexity: Dict[str, Optional[float]]) -> Optional[float]:
    """The share of the perplexity pruning lost that training won back, on a log scale:
    (log ppl_pruned - log ppl_after) / (log ppl_pruned - log ppl_dense)."""
    before, after, dense = (perplexity.get(k) for k in ("before", "after", "dense"))
    if None in (before, after, dense) or before <= dense:
        return None
    return (math.log(before) - math.log(after)) / (math.log(before) - math.log(dense))


def held_out_overall(job) -> Dict[str, Optional[float]]:
    """{"before", "after", "dense"}: the perplexity over all the held-out windows."""
    return {when: None if ppl is None else ppl["all"] for when, ppl in job.held_out_perplexity.items()}


def throughput(job) -> Tuple[float, Optional[float]]:
    """(training seconds, tokens per second) of this run's own steps (not those before a resume)."""
    runtime = job.result.metrics.get("train_runtime", job.timings["train_s"])
    steps = job.trainer.state.global_step - job.plan.status.resume_step
    tokens = steps * job.plan.effective_batch_size * job.args.block_size
    return runtime, (tokens / runtime if tokens and runtime > 0 else None)


def _steady_tokens_per_s(job) -> Optional[float]:
    seconds = job.clock.steady_seconds_per_step() if job.clock is not None else None
    return job.plan.effective_batch_size * job.args.block_size / seconds if seconds else None


def print_results(job, runtime: float, tokens_per_s: Optional[float]) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    (bh, bw), ppl, zeros, blocks = job.trainer.block_size, job.perplexity, job.sparsity, job.pruned_blocks
    print("\n" + "=" * 42)
    print("Results" + (f" ({job.evaluated})" if job.evaluated else " (perplexity skipped)"))
    dense = ppl["dense"] is not None
    ood = held_out_overall(job)
    ood_row = [("Perplexity, out of domain", fmt(ood["before"]), fmt(ood["after"])) + ((fmt(ood["dense"]),) if dense
                                                                                        else ())]
    print(_table([("", "pruned (before)", "fine-tuned (after)") + (("dense (teacher)",) if dense else ()),
                  ("Perplexity", fmt(ppl["before"]), fmt(ppl["after"])) + ((fmt(ppl["dense"]),) if dense else ())]
                 + (ood_row if ood["before"] is not None else []) + [
                  ("Sparsity (exact zeros)", f"{zeros['before']:.4f}", f"{zeros['after']:.4f}") + (("",) * dense),
                  (f"Pruned {bh}x{bw} blocks", f"{blocks['before']:.4f}", f"{blocks['after']:.4f}")
                  + (("0.0000",) if dense else ())]))
    if ood["before"] is not None:
        print(f"Out of domain: {job.held_out_note}")
    recovered, recovered_ood = recovered_fraction(ppl), recovered_fraction(ood)
    if recovered is not None:
        print(f"Recovered {recovered:.1%} of the perplexity pruning lost"
              + (f" ({recovered_ood:.1%} out of domain)" if recovered_ood is not None else "")
              + " (log scale: pruned -> fine-tuned, over pruned -> dense)")
    if zeros["after"] < zeros["before"]:
        print(f"(every pruned block is still exactly zero; the {zeros['before'] - zeros['after']:.6f} fewer exact "
              "zeros were live weights that happened to be zero before and have trained)")
    steady = _steady_tokens_per_s(job)
    print(f"Training: {job.trainer.state.global_step} steps, {runtime:.1f} s"
          + (f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s else "")
          + (f" ({steady:,.0f} once warm)" if steady else "")
          + (f", of which {job.clock.checkpoint_seconds:.1f} s paused for "
             f"{_count(len(job.trainer.checkpoint_writer.records), 'checkpoint')}"
             if job.clock is not None and job.clock.checkpoint_seconds > 0 else "")
          + f"; total {job.timings['total_s']:.1f} s")
    print(f"Saved to {job.output_dir}")
    print("=" * 42)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def write_report(job, tokens_per_s: Optional[float]) -> None:
    args, t, plan, state = job.args, job.training_args, job.plan, job.trainer.state
    first, last = plan.status.resume_step + 1, state.global_step
    ood = held_out_overall(job)
    report = {
        "model": args.model, "output_dir": str(job.output_dir),
        "dataset": describe_dataset(args.dataset, args.dataset_path),
        "evaluated": job.evaluated, "perplexity": job.perplexity,
        "recovered_fraction": recovered_fraction(job.perplexity),
        # held_out.py's text unlike the corpus: all its windows together, then by kind
        "out_of_domain": {"evaluated": job.held_out_note, "kinds": held_out.kinds_described(),
                          "perplexity": ood, "recovered_fraction": recovered_fraction(ood),
                          "by_kind": job.held_out_perplexity},
        "teacher_text": job.teacher_text,
        # --lora: the adapters, and where their PEFT-format copy is (the output folder holds the merged model)
        "lora": None if plan.lora is None else {**plan.lora.as_dict(),
                                                "adapter": str(job.output_dir / lora.ADAPTER_DIR)},
        "memory_plan": None if job.memory is None else {
            "micro_batch": job.memory.chosen.micro_batch, "gradient_checkpointing": job.memory.chosen.checkpointing,
            "gradient_accumulation_steps": job.memory.gradient_accumulation_steps, "budget_bytes": job.memory.budget,
            "reserved_bytes": job.memory.reserved,
            "trials": [{"micro_batch": tr.candidate.micro_batch, "checkpointing": tr.candidate.checkpointing,
                        "peak_bytes": tr.peak, "seconds": tr.seconds} for tr in job.memory.trials],
            # the chosen candidate's trial peak, and the most the training of this process reserved
            "trial_peak_bytes": next((tr.peak for tr in job.memory.trials if tr.candidate == job.memory.chosen),
                                     None),
            "training_peak_bytes": job.training_peak},
        "liger_kernel": bool(t.use_liger_kernel),
        "peak_memory_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() and not job.plan.on_cpu
        else None,
        # The sharded step's weight and landing buffers: symmetric memory on GPUs, outside the peak above.
        "sharded_step_buffer_bytes": (job.trainer.sparse_optimizer.buffer_bytes()
                                      if job.trainer.sharded_step and job.trainer.sparse_optimizer else None),
        "sparsity": job.sparsity,
        "pruned_block_fraction": job.pruned_blocks,
        # train_loss: over every step of the run, resumes included; this_process: the steps this process ran
        "steps": state.global_step, "train_loss": whole_run_loss(state.log_history),
        "this_process": {"first_step": first if last >= first else None, "last_step": last if last >= first else None,
                         "train_loss": whole_run_loss(state.log_history, after=plan.status.resume_step)},
        "recipe": {"learning_rate": t.learning_rate, "lr_scheduler_type": str(t.lr_scheduler_type),
                   "warmup_steps": t.warmup_steps, "warmup_ratio": getattr(t, "warmup_ratio", None),
                   "steps": state.global_step,
                   "effective_batch_size": plan.effective_batch_size, "max_grad_norm": t.max_grad_norm,
                   "weight_decay": t.weight_decay,
                   "distillation": None if job.teacher is None else {"teacher": args.teacher,
                                                                     **job.trainer.distill.as_dict()}},
        "effective_batch_size": plan.effective_batch_size, "block_size": args.block_size,
        "learning_rate": t.learning_rate, "world_size": plan.world_size,
        "device": str(t.device), "dtype": args.dtype, "bf16_autocast": bool(t.bf16),
        "fsdp": bool(job.trainer.fsdp_version), "data_parallel": data_parallel(plan),
        "masks_file": args.masks_file, "configuration": plan.config,
        "resumed_from": plan.resume_from, "timings_s": job.timings,
        "tokens_per_s": tokens_per_s,
        "steady_tokens_per_s": _steady_tokens_per_s(job),  # leaving out the first steps (StepClock)
        "checkpoint_s": job.clock.checkpoint_seconds if job.clock is not None else None,  # within the training time
        # each checkpoint of this process: how long training waited for it, how long its write took, its size
        "checkpoints": [record.as_dict() for record in job.trainer.checkpoint_writer.records],
        "training_peak_memory_bytes": job.training_peak,
        "disk_plan": None if job.disk is None else {
            "high_water_bytes": job.disk.high_water, "checkpoint_bytes": job.disk.checkpoint,
            "final_bytes": job.disk.final, "free_bytes": job.disk.free, "peak": job.disk.peak_when},
        "versions": versions(),
    }
    write_json(job.output_dir / REPORT_FILE, report)


def _before_after(pair) -> str:
    if not isinstance(pair, dict) or pair.get("before") is None:
        return "skipped"
    return " -> ".join("-" if pair.get(k) is None else f"{pair[k]:.4f}" for k in ("before", "after"))


def summary_line(report: Dict[str, Any]) -> str:
    """The line a rerun of a complete run prints from its finetune_report.json."""
    dense = (report.get("perplexity") or {}).get("dense")
    ood = report.get("out_of_domain") or {}
    return (f"  perplexity {_before_after(report.get('perplexity'))}"
            + (f" (dense {dense:.4f}, {report['recovered_fraction']:.1%} of the loss recovered)"
               if dense is not None and report.get("recovered_fraction") is not None else "")
            + (f" | out of domain {_before_after(ood.get('perplexity'))}"
               + (f" ({ood['recovered_fraction']:.1%} recovered)" if ood.get("recovered_fraction") is not None
                  else "") if (ood.get("perplexity") or {}).get("before") is not None else "")
            + " | sparsity (exact zeros) "
            f"{_before_after(report.get('sparsity'))} | pruned blocks "
            f"{_before_after(report.get('pruned_block_fraction'))}")
