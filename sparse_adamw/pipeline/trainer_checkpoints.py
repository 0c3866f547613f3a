"""How SparseTrainer writes and reads its checkpoints: `CheckpointWriting`, a mixin of Trainer overrides.

- A checkpoint is a snapshot of the weights and optimizer state into host buffers, written by a CheckpointWriter on
  a thread while training goes on (checkpoints.py), complete once its folder is renamed into place; written in place
  where no snapshot can be taken (FSDP2, fp16's scaler, hyperparameter trials). A failed write costs only itself.
- Every save checks first that the pruned blocks are still exactly zero.
- Under FSDP2 and the sharded step, optimizer.pt holds the one-process format (or one file per rank with
  SHARDED_STATE_DICT), so a run resumes on another number of GPUs.

The mixin reads what SparseTrainer sets up: checkpoint_writer, snapshots, frozen_in_checkpoints, checkpoint_at_end,
sigint_callback, sharded_step, sparse_optimizer, fsdp_version, verify_sparsity, _synchronize_weights and
_bind_fsdp_masks.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import TrainerCallback

from ..sparsity import SparsityViolation
from .checkpoints import WRITE_ERRORS, CheckpointJob, discard_failed_checkpoint, staging_folder, tensors_of
from .run_folder import OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE, sharded_optimizer_file

logger = logging.getLogger("sparse_adamw")


class CheckpointTiming(TrainerCallback):
    """When checkpoints happen: the host buffers of a snapshot are allocated after the first step of a train(), and
    the end of training writes a checkpoint only with `checkpoint_at_end` (or when a signal stops it there): the
    final model follows at once, and a checkpoint beside it would only cost its time and disk."""

    def __init__(self, trainer: "CheckpointWriting"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if args.save_strategy != "no":
            self.trainer.reserve_snapshot_buffers()
        return self.on_epoch_end(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        stopped_by_signal = trainer.sigint_callback is not None and trainer.sigint_callback.stopped_at is not None
        if state.global_step >= state.max_steps > 0 and not trainer.checkpoint_at_end and not stopped_by_signal:
            control.should_save = False
        return control


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (tied weights: lm_head and the embeddings)."""
    return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def _unique(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict with each tensor once: a checkpoint holds one of tied weights, as save_pretrained writes it."""
    seen, unique = set(), {}
    for name, tensor in state_dict.items():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


class CheckpointWriting:
    """SparseTrainer's checkpoint overrides of transformers.Trainer (see the module docstring); mixed in before
    Trainer, so that super() reaches the Trainer's own."""

    def _save_checkpoint(self, model, trial):
        """A snapshot now, written by self.checkpoint_writer while training goes on (checkpoints.py); in place
        where the snapshot cannot be taken (FSDP2, fp16's scaler, hyperparameter trials). Either way a failed write
        costs only that checkpoint."""
        if not self._snapshots_checkpoints(trial):
            return self._save_checkpoint_in_place(model, trial)
        start = time.perf_counter()
        self.checkpoint_writer.wait()  # the last checkpoint is complete, and the host buffers are free again
        self.store_flos()
        final = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        staging = staging_folder(final)
        job = self._snapshot(final, staging)
        if job is None:
            return
        job.stall_s = time.perf_counter() - start
        # The last checkpoint of this train() (a Ctrl+C's, or the end's): complete before train() returns.
        self.checkpoint_writer.submit(job, wait=self.control.should_training_stop)

    def _checkpoint_weights(self, model) -> Dict[str, torch.Tensor]:
        """What a checkpoint's weights file holds: every weight once, or with frozen_in_checkpoints=False only the
        parameters that train."""
        state_dict = _unique(model.state_dict())
        if self.frozen_in_checkpoints:
            return state_dict
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        return {name: t for name, t in state_dict.items() if name in trained}

    def _snapshots_checkpoints(self, trial) -> bool:
        return (trial is None and self.hp_search_backend is None and not self.fsdp_version
                and not self.is_deepspeed_enabled and not self.args.save_only_model and not self.args.push_to_hub
                and not self.args.fp16)

    def _save_checkpoint_in_place(self, model, trial) -> None:
        final = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except SparsityViolation:
            raise
        except WRITE_ERRORS as err:
            self._checkpoint_failed(final, final, err)

    def _checkpoint_failed(self, final: Path, partial: Path, err: BaseException) -> None:
        """One line; the partial files go; training goes on."""
        if self.args.should_save:
            print(discard_failed_checkpoint(final, partial, err), flush=True)

    def _snapshot(self, final: Path, staging: Path) -> Optional[CheckpointJob]:
        """Every rank: the collectives a checkpoint needs and its own RNG state; the main process: the small files
        into `staging`, and the weights and optimizer state copied to host buffers (or, written in place, the live
        tensors). None when a small file could not be written (every rank then skips this checkpoint)."""
        args = self.args
        self.verify_sparsity(f"before saving {final}")
        self._synchronize_weights()
        model = self.accelerator.unwrap_model(self.model)
        weights = self._checkpoint_weights(model)
        state, fresh = None, False
        if self.sharded_step:  # gathered to rank 0, as host copies of its own
            state, fresh = self.sparse_optimizer.full_state_dict(rank0_only=True), True
        elif args.should_save:
            state = self.optimizer.state_dict()
        failed = None
        try:
            staging.mkdir(parents=True, exist_ok=True)
            self._save_rng_state(str(staging))
            if args.should_save:
                self._save_small_files(model, staging)
        except WRITE_ERRORS as err:
            failed = err
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([0.0 if failed is None else 1.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if failed is None and flag.item():
                failed = OSError("another process could not write its files")
        if failed is not None:
            self._checkpoint_failed(final, staging, failed)
            return None
        if not args.should_save:
            return None
        job = CheckpointJob(self.state.global_step, staging, final, weights, state, keep=args.save_total_limit)
        if self.checkpoint_writer.background:
            # In one process the next step's update waits for the copies on the GPU (the step pre-hook); with
            # several, the host waits here: the sharded step's peers keep sending weights into these tensors.
            if not self.snapshots.take(job, fresh, wait=args.world_size > 1):
                self.checkpoint_writer.background = False  # no room in host memory: in place from now on
        return job

    def _save_small_files(self, model, staging: Path) -> None:
        """What a checkpoint holds besides the weights and optimizer.pt, as the Trainer writes it."""
        from transformers.trainer import TRAINING_ARGS_NAME
        from transformers.trainer_callback import ExportableState

        model.config.dtype = str(model.dtype).split(".")[1]  # as save_pretrained records it
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(staging)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(staging))
        torch.save(self.args, staging / TRAINING_ARGS_NAME)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note that the optimizer state is saved separately
            torch.save(self.lr_scheduler.state_dict(), staging / SCHEDULER_FILE)
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = type(cb).__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()
        self.state.save_to_json(str(staging / TRAINER_STATE))

    def reserve_snapshot_buffers(self) -> None:
        """After the first step: the host buffers of a snapshot, allocated on a thread while training goes on."""
        if (not self.checkpoint_writer.background or not self.args.should_save or self.snapshots.reserved
                or not self._snapshots_checkpoints(None)):  # FSDP2 and the like write in place: no buffers
            return
        weights = list(self._checkpoint_weights(self.accelerator.unwrap_model(self.model)).values())
        state = [] if self.sharded_step else tensors_of(self.optimizer.state_dict())
        if not self.snapshots.reserve(weights, state):
            self.checkpoint_writer.background = False

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        # Every checkpoint and the final save pass through here: never write a model that lost its sparsity.
        self.verify_sparsity(f"before saving to {output_dir or self.args.output_dir}")
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        if state_dict is None and not self.frozen_in_checkpoints:
            state_dict = self._checkpoint_weights(self.accelerator.unwrap_model(self.model))
        if state_dict is None and self.sharded_step:
            # ShardedSparseAdamW keeps every weight in one buffer, which save_pretrained would take for tied weights:
            # save host copies instead (tied weights stay tied: one copy per storage offset).
            self._synchronize_weights()
            copies: Dict[tuple, torch.Tensor] = {}
            state_dict = {}
            for name, tensor in self.accelerator.unwrap_model(self.model).state_dict().items():
                key = _storage_key(tensor)
                if key not in copies:
                    copies[key] = tensor.detach().to("cpu", copy=True)
                state_dict[name] = copies[key]
        return super()._save(output_dir, state_dict)

    # --------------------------------------------------- optimizer checkpoints under FSDP2 and the sharded step
    def _full_optimizer_state(self) -> bool:
        return "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.fsdp_version != 2 and not self.sharded_step:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.fsdp_version == 2:
            # accelerate's save_fsdp_optimizer goes through torch.distributed.checkpoint, which assumes param-shaped
            # states; SparseAdamW's are compact. The model part is saved as the Trainer saves it (it loads it back).
            from accelerate.utils import save_fsdp_model
            from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

            save_fsdp_model(self.accelerator.state.fsdp_plugin, self.accelerator, self.model, output_dir,
                            **get_fsdp_ckpt_kwargs())
        optimizer = self.sparse_optimizer
        os.makedirs(output_dir, exist_ok=True)
        if self.sharded_step or self._full_optimizer_state():
            # The format of a single-process run's optimizer.pt: resumable on any number of ranks, or none. Every
            # rank takes part in the gather; rank 0 writes it.
            state = optimizer.full_state_dict(rank0_only=True)
            if self.args.should_save:
                torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE))
        else:
            torch.save(optimizer.state_dict(),
                       os.path.join(output_dir, sharded_optimizer_file(self.args.process_index, self.args.world_size)))
        if self.args.should_save:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note that the optimizer state is saved separately
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        self._resumed = checkpoint is not None
        if checkpoint is None or self.fsdp_version != 2:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self._bind_fsdp_masks(required=True)
        optimizer = self.sparse_optimizer
        rank, world = self.args.process_index, self.args.world_size
        sharded = os.path.join(checkpoint, sharded_optimizer_file(rank, world))
        full = os.path.join(checkpoint, OPTIMIZER_FILE)
        if os.path.isfile(sharded):
            optimizer.load_state_dict(torch.load(sharded, map_location="cpu", weights_only=True))
        elif os.path.isfile(full):
            # Every rank reads the whole file, memory-mapped, and keeps its own rows.
            optimizer.load_full_state_dict(torch.load(full, map_location="cpu", weights_only=True, mmap=True))
        else:
            others = sorted(Path(checkpoint).glob(sharded_optimizer_file(0, "*")))
            if others:
                raise ValueError(f"{checkpoint} holds the optimizer state of a run on a different number of ranks "
                                 f"({others[0].name}); this run has {world}. Resume on as many ranks, or save "
                                 "checkpoints with fsdp_config state_dict_type FULL_STATE_DICT, which any number "
                                 "of ranks can load")
            logger.warning("%s has no optimizer state: the optimizer starts afresh", checkpoint)
            return
        scheduler = os.path.join(checkpoint, SCHEDULER_FILE)
        if os.path.isfile(scheduler):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
