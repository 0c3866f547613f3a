"""How a fine-tune ends: a checkpoint that holds every step taken over instead of training again, and the final
model written whole or not at all (a staging folder, then its files renamed into the output folder with Ctrl+C held
back). `job` is finetune.py's record of the run."""
from __future__ import annotations

import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List

from ..masks import MASKS_FILE, pruned_block_leaks, save_masks
from ..sparsity import SparsityViolation
from . import lora
from .checkpoints import WRITE_ERRORS, describe_error
from .cli import timed
from .run_folder import STAGING, TRAINER_STATE, install, load_weights, newest_checkpoint


def adopt_checkpoint(job) -> None:
    """The checkpoint holds every step (the run stopped after its last one, before its end was written): take its
    weights and state instead of training, since a Trainer resumed there would train one step more."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    checkpoint, trainer = job.plan.resume_from, job.trainer
    if Path(checkpoint) == job.output_dir:
        job.say(f"{checkpoint} holds the fine-tuned model of all {job.plan.status.resume_step} steps: finishing the run "
                "from it")
    else:
        job.say(f"{checkpoint} holds all {job.plan.status.resume_step} steps: finishing the run from it")
    if job.plan.lora is not None:
        lora.adopt_adapters(job, checkpoint)
    else:
        load_weights(job.model, checkpoint)
        leaked = pruned_block_leaks(dict(job.model.named_parameters()), trainer.masks, trainer.block_size)
        if leaked:
            raise SparsityViolation(f"{checkpoint}: pruned blocks are nonzero in {'; '.join(leaked[:3])}")
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    job.result, job.timings["train_s"] = TrainOutput(trainer.state.global_step, None, {}), 0.0
    if job.plan.lora is None:  # --lora: job.masks are the frozen weights', checked at the merge
        job.masks = dict(trainer.masks)
        job.say(f"Masks checked: {len(job.masks)} weights still have exactly zero pruned blocks")


def write(job, pause: Callable[[str], None]) -> bool:
    """The final model, its trainer state and masks go to STAGING, then their files are renamed into the output
    folder with SIGINT held back: the final model is whole or absent. Every process takes part (FSDP2 gathers).
    A write that fails (a full disk) removes STAGING and keeps the checkpoints: one line, and False. `pause` is
    the tests' hook before the renames."""
    from .models import save_model

    if job.plan.status.trained and Path(job.plan.resume_from) == job.output_dir:
        return True  # the fine-tuned model is in place already
    staging = job.output_dir / STAGING
    try:
        with timed(job.timings, "save_s"):
            if job.plan.lora is not None:
                if job.main:
                    lora.write_result(job, staging)
            elif not job.plan.status.trained:
                job.trainer.save_model(str(staging))
            elif job.main:  # adopted from a checkpoint: a plain model, never wrapped
                save_model(job.model, job.tokenizer, staging)
            if job.main:
                job.trainer.state.save_to_json(str(staging / TRAINER_STATE))
                save_masks(staging / MASKS_FILE, job.masks, job.trainer.block_size)
    except SparsityViolation:
        raise
    except WRITE_ERRORS as err:
        shutil.rmtree(staging, ignore_errors=True)
        if job.main:
            newest = newest_checkpoint(job.output_dir)
            print(f"error: the fine-tuned model could not be written to {job.output_dir} ({describe_error(err)}); "
                  + (f"{newest} is kept: make room and rerun the same command to resume from it" if newest else
                     "no checkpoint was kept: make room and rerun the same command to train again"),
                  file=sys.stderr, flush=True)
        return False
    if job.main:
        pause("install")
        with signals_held_back():
            install(staging, job.output_dir, skip=("training_args.bin",))  # run_config.json says it all
    return True


@contextmanager
def signals_held_back() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (renaming the final files into place: all or none).

    Masking the signals (pthread_sigmask) would cover the calling thread only: the process's other threads (tqdm's
    monitor, the checkpoint writer) would take a Ctrl+C, and Python would still raise it in the main thread mid-block.
    So the handlers themselves wait: a signal that arrives during the block (on any thread: Python runs handlers on
    the main thread) is noted, and raised again once the block is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
