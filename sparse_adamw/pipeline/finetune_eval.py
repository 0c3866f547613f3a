"""The fine-tune's measurements around training: perplexity on the corpus's validation windows and on the held-out
text, of the pruned model and the dense teacher before training and of the fine-tuned model after, and the sparsity
after. `job` is finetune.py's record of the run; results.py reports what lands in it."""
from __future__ import annotations

import time

from ..sparsity import check_sparsity, pruned_fraction
from .cli import timed


def _perplexity(job, model, when: str) -> None:
    """Perplexity `when` ("before", "after" or "dense"), timed as eval_<when>_s; on the held-out text too, when it
    is at hand (eval_<when>_held_out_s)."""
    from .evaluate import held_out_perplexity, perplexity

    t = job.training_args
    with timed(job.timings, f"eval_{when}_s"):
        job.perplexity[when] = perplexity(model, job.windows, t.per_device_eval_batch_size, t.device,
                                          progress=False)
    if job.held_out is not None:
        with timed(job.timings, f"eval_{when}_held_out_s"):
            job.held_out_perplexity[when] = held_out_perplexity(model, job.held_out, t.per_device_eval_batch_size,
                                                                t.device, progress=False)


def _held_out_line(job, when: str) -> str:
    ppl = job.held_out_perplexity[when]
    return "" if ppl is None else f"; out of domain {ppl['all']:.4f} ({job.timings[f'eval_{when}_held_out_s']:.1f} s)"


def before(job) -> None:
    """Perplexity of the pruned model, and of the dense teacher where there is one (main process)."""
    if job.trainer.fsdp_version:
        job.model.to(job.training_args.device)  # the Trainer leaves placement to FSDP, which shards it later
    job.say(f"Perplexity of the pruned model on {job.evaluated}...", flush=True)
    job.say(f"Out of domain: {job.held_out_note}")
    _perplexity(job, job.model, "before")
    job.say(f"Perplexity before fine-tuning: {job.perplexity['before']:.4f} ({job.timings['eval_before_s']:.1f} s)"
            + _held_out_line(job, "before"))
    if job.teacher is not None:
        if job.trainer.fsdp_version:
            job.teacher.to(job.training_args.device)
        _perplexity(job, job.teacher, "dense")
        job.say(f"Perplexity of the dense teacher: {job.perplexity['dense']:.4f} ({job.timings['eval_dense_s']:.1f} s)"
                + _held_out_line(job, "dense"))


def after(job) -> None:
    """Sparsity and perplexity of the trained model (main process)."""
    from .models import load_model

    trainer = job.trainer
    model = job.model if job.plan.status.trained else trainer.model
    if trainer.fsdp_version and not job.plan.status.trained:
        # The trained model is sharded over the ranks: evaluate the whole model that save_model wrote.
        model, _ = load_model(str(job.output_dir), job.training_args.device, job.args.dtype)
    job.sparsity["after"] = check_sparsity(model, verbose=False)
    job.pruned_blocks["after"] = pruned_fraction(model, job.masks, trainer.block_size)
    if job.windows is not None:
        _perplexity(job, model, "after")
    job.timings["total_s"] = time.perf_counter() - job.started
