"""Full fine-tuning of a block-pruned model with SparseAdamW inside a Hugging Face Trainer.

`SparseTrainer` is a `transformers.Trainer` (its checkpoint overrides are in trainer_checkpoints.py) that
- derives the block masks from the pruned model once, when it is made (or loads the prune step's
  `block_masks.pt` and checks it against the model then), and keeps them in `trainer.masks` ({name: mask});
- creates SparseAdamW with the Trainer's usual param groups (no weight decay on biases and norms) and those masks;
- checks that every pruned block is still exactly zero when training resumes from a checkpoint, at every save and
  at the end, and raises `SparsityViolation` otherwise;
- clips the gradients by the norm of the live blocks only (`SparseAdamW.clip_grad_norm_`, which the step applies
  as it reads them), so NaN or inf in a pruned block's gradient, which SparseAdamW never reads, cannot poison the
  live weights; that norm is the logged grad_norm;
- turns the first Ctrl+C (SIGINT) or SIGTERM (what batch schedulers send before they kill) into a checkpoint at the
  end of the current optimizer step and a clean stop (`trainer.interrupted` is then True); a second one raises
  `TrainingAborted` (a KeyboardInterrupt) at once, even in the middle of the save: that checkpoint stays incomplete
  (no trainer_state.json, which is written last). Rerunning with `trainer.train(resume_from_checkpoint=...)`
  restores the optimizer state exactly: masks, m, v and step all travel in the checkpoint's optimizer.pt.

    from sparse_adamw.pipeline.trainer import SparseTrainer

    trainer = SparseTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    trainer.train()                      # or: masks_file="pruned_model/block_masks.pt"

SparseAdamW also works in a plain Trainer; pass it through `optimizers` (the Trainer then builds only the
scheduler). Group the parameters yourself; here 1-D parameters (norms, biases) get no weight decay:

    from transformers import Trainer
    from sparse_adamw import SparseAdamW
    from sparse_adamw.pipeline.trainer import SigintCheckpointCallback

    params = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = SparseAdamW(params, lr=5e-5, masks="auto")   # masks from the all-zero 16x16 blocks
    trainer = Trainer(model=model, args=training_args, train_dataset=train, optimizers=(optimizer, None),
                      callbacks=[SigintCheckpointCallback()])   # optional: Ctrl+C saves and stops
    trainer.train()

`masks="auto"` gives a mask to every 2-D parameter with an all-zero block, embeddings included;
`linear_block_masks(model)` restricts them to nn.Linear weights, as SparseTrainer does
(`masks={param: mask}` with the parameters looked up by name).

And in a plain PyTorch loop, with gradient accumulation and clipping:

    optimizer = SparseAdamW(model.parameters(), lr=5e-5, weight_decay=0.0, masks="auto")
    for step, batch in enumerate(loader):
        loss = model(**batch).loss / accumulation
        loss.backward()
        if (step + 1) % accumulation == 0:
            optimizer.clip_grad_norm_(1.0)   # the live blocks' norm; the step scales as it reads
            optimizer.step()             # pruned blocks are neither read nor written
            optimizer.zero_grad(set_to_none=True)
    torch.save(optimizer.state_dict(), "optimizer.pt")   # masks, m, v and step; load_state_dict restores them

Gradients of pruned blocks are not masked (that would cost a pass over every gradient). torch's clip_grad_norm_
counts them in the norm, which only rescales the whole step, unless one of them is NaN or inf: then every weight
becomes NaN; it also costs two passes over every gradient. `optimizer.clip_grad_norm_(1.0)` reads only the live
blocks once and leaves the scaling to the step, as SparseTrainer does. SparseTrainer runs in one process, under DDP
(torchrun), or under the Trainer's FSDP2 (torchrun on GPUs):

    # what `python -m sparse_adamw.pipeline.finetune --fsdp` sets
    args = TrainingArguments(..., fsdp=True, fsdp_config={"version": 2})

The Trainer builds the optimizer on the whole parameters, then accelerate shards the model (fully_shard) and swaps
the optimizer's parameters for the DTensor row shards. SparseTrainer therefore sets the masks after that swap, by
name: the ones it derived or checked when it was made, from the whole weights before sharding, so every rank has the
same masks and nothing is gathered. The pruned blocks are checked on every rank's rows (one all-reduce). A
checkpoint's optimizer.pt holds `SparseAdamW.full_state_dict()`, the format of a one-process run (resumable on any
number of ranks, or in one process); with fsdp_config `state_dict_type: SHARDED_STATE_DICT` each rank writes its own
`optimizer-rank{r}-of-{n}.pt` instead (no gather; resumable on as many ranks). accelerate's own FSDP optimizer
checkpointing (torch.distributed.checkpoint) assumes param-shaped states and is not used. FSDP1 and DeepSpeed ZeRO
hand the optimizer flattened parameters, which destroy the block structure: refused with an error. accelerate runs
FSDP on accelerators only; on the CPU it trains with DDP instead (SparseTrainer warns).

`data_parallel="sharded"` replaces DDP with ShardedSparseAdamW (sparse_adamw.sharded_step): the model is not wrapped
(accelerate prepares it as for evaluation), each rank steps the parameters it owns, and the gradients and updated
weights travel between the GPUs of one host by copy engine, leaving the SMs to the matmuls. The gradients travel on
the last micro-step of accumulation only (the Trainer's sync_gradients). Checkpoints hold the gathered optimizer state
in the single-process format, so a run saved under one mode resumes under the other, or in one process.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from transformers import Trainer, TrainerCallback

from ..dtensor import is_dtensor
from ..masks import BlockSize, load_masks, normalize_block_size
from ..optimizer import SparseAdamW
from ..sharded_step import ShardedSparseAdamW
from ..sparsity import SparsityViolation, check_given_masks, linear_block_masks, verify_block_sparsity
from .callbacks import SigintCheckpointCallback, SignalCheckpointCallback, StepLogCallback, TrainingAborted
from .checkpoints import CheckpointWriter, Snapshots
from .distill import DistillConfig, check_teacher, distill_loss, freeze_teacher, shard_teacher
from .models import forward_groups
from .trainer_checkpoints import CheckpointTiming, CheckpointWriting

__all__ = [
    "SigintCheckpointCallback",
    "SignalCheckpointCallback",
    "SparseTrainer",
    "SparsityViolation",
    "StepLogCallback",
    "TrainingAborted",
    "linear_block_masks",
    "verify_block_sparsity",
]


def _sparse_optimizer(optimizer) -> Optional[SparseAdamW]:
    """The SparseAdamW inside accelerate's AcceleratedOptimizer (or the optimizer itself), else None."""
    while optimizer is not None and not isinstance(optimizer, SparseAdamW):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class _SparsityGuard(TrainerCallback):
    """Binds the masks under FSDP2 once the optimizer is in place. Checks them only where the weights or the masks
    were not the ones the trainer was made with: after a resume (both come from the checkpoint's files) or a
    model_init. On a fresh start the masks were derived from these very weights, or checked against them."""

    def __init__(self, trainer: "SparseTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._bind_fsdp_masks(required=True)
        if trainer._resumed or trainer.model_init is not None:
            trainer.verify_sparsity("at the start of training")
        trainer._resumed = False


class SparseTrainer(CheckpointWriting, Trainer):
    """A transformers.Trainer that fine-tunes a block-pruned model with SparseAdamW and keeps it pruned.

    Args (besides the Trainer's own):
        masks: {parameter name: bool block mask (True = live)}; default: `linear_block_masks(model)`, the
            all-zero blocks of every nn.Linear weight when the trainer is made.
        masks_file: a `block_masks.pt` written by `python -m sparse_adamw.pipeline.prune` (or
            sparse_adamw.masks.save_masks); its block shape wins over `block_size`. Mutually exclusive with `masks`.
        block_size: block shape of the masks, int or (bh, bw); default 16.
        optimizer_impl: SparseAdamW's `impl` ("auto", "torch", "triton").
        state_dtype: SparseAdamW's `state_dtype` (None = fp32, or torch.bfloat16).
        handle_sigint: install SignalCheckpointCallback: Ctrl+C or SIGTERM checkpoints and stops (default True).
        teacher: a dense model to distil from (sparse_adamw.pipeline.distill): frozen, put in eval mode and on the
            training device (under FSDP2, sharded like the student at the first step). Same vocabulary and
            architecture as the model, else ValueError.
        distill: DistillConfig (alpha, temperature, hidden-state weight); default DistillConfig() with a teacher.
        data_parallel: "ddp" (default) or "sharded": under torchrun, ShardedSparseAdamW instead of DDP (see the
            module docstring); not with FSDP or DeepSpeed.
        background_checkpoints: take a snapshot of the weights and optimizer state into host memory at each
            checkpoint and write it on a thread while training goes on (default True; checkpoints.py). A checkpoint
            is complete once its folder is renamed from .tmp-checkpoint-N; a failed write costs only itself.
        checkpoint_at_end: write a checkpoint at the last step, as the Trainer does (default True); the fine-tune
            passes False, since it writes the final model there.
        frozen_in_checkpoints: checkpoints hold every weight (default True); False: only the parameters that train
            (masked LoRA: the adapters, a few MB, where the frozen model is GBs). A resume then loads those into the
            model it starts from, which must hold the same frozen weights (the fine-tune's fingerprint checks it).

    The optimizer uses args.learning_rate, adam_beta1/2, adam_epsilon, weight_decay and seed (for the stochastic
    rounding of bf16 weights); `args.optim` is ignored. Given masks are checked against the model right away
    (ValueError for unknown names or shapes, SparsityViolation for nonzeros in blocks they mark pruned).
    `trainer.masks` holds the masks, {name: bool mask on the CPU}, derived or checked once; the optimizer gets them
    without another pass over the weights. If `optimizers=(optimizer, scheduler)` is passed, the optimizer must be
    a SparseAdamW.
    """

    def __init__(
        self,
        *args,
        masks: Optional[Dict[str, torch.Tensor]] = None,
        masks_file: Union[None, str, Path] = None,
        block_size: BlockSize = 16,
        optimizer_impl: str = "auto",
        state_dtype: Union[None, str, torch.dtype] = None,
        handle_sigint: bool = True,
        teacher: Optional[torch.nn.Module] = None,
        distill: Optional[DistillConfig] = None,
        data_parallel: str = "ddp",
        background_checkpoints: bool = True,
        checkpoint_at_end: bool = True,
        frozen_in_checkpoints: bool = True,
        **kwargs,
    ):
        if masks is not None and masks_file is not None:
            raise ValueError("pass either masks or masks_file, not both")
        if data_parallel not in ("ddp", "sharded"):
            raise ValueError(f"data_parallel must be 'ddp' or 'sharded', got {data_parallel!r}")
        self.data_parallel = data_parallel
        self.block_size = normalize_block_size(block_size)
        if masks_file is not None:
            masks, self.block_size = load_masks(masks_file)
        self.masks_file = None if masks_file is None else str(masks_file)
        self.optimizer_impl = optimizer_impl
        self.state_dtype = state_dtype
        self._fsdp_masks_pending = False
        self._resumed = False  # set when a checkpoint's optimizer state is loaded
        self.checkpoint_at_end = checkpoint_at_end
        self.frozen_in_checkpoints = frozen_in_checkpoints
        self.checkpoint_writer = CheckpointWriter(background=background_checkpoints)
        self.snapshots = Snapshots()
        self._step_hook = None
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "SparseTrainer does not support DeepSpeed: ZeRO hands the optimizer flattened partitions of the "
                "parameters, which destroys the 2-D block structure the masks describe. Use FSDP2 (--fsdp, or "
                "TrainingArguments(fsdp=True, fsdp_config={\"version\": 2})) or DDP (torchrun)"
            )
        if self.is_fsdp_enabled and self.fsdp_version != 2:
            raise NotImplementedError(
                f"SparseTrainer does not support FSDP{self.fsdp_version}: its flat parameters destroy the 2-D "
                "block structure the masks describe. Use FSDP2, which shards each parameter by rows: "
                "fsdp_config={\"version\": 2} (transformers' default)"
            )
        if self.sharded_step and (self.is_fsdp_enabled or self.args.world_size < 2):
            raise ValueError("data_parallel='sharded' needs several processes (torchrun) and no FSDP")
        if getattr(self.args, "fsdp_plugin_args", None) and not self.is_fsdp_enabled:
            warnings.warn("FSDP was requested but accelerate did not enable it (it runs FSDP on accelerators only, "
                          "not on the CPU): training with DDP, every rank holding the whole model", stacklevel=2)
        if self.optimizer is not None and not isinstance(self.optimizer, SparseAdamW):
            raise TypeError(f"SparseTrainer needs a SparseAdamW optimizer, got {type(self.optimizer).__name__}")
        self.sigint_callback = SigintCheckpointCallback() if handle_sigint else None
        if self.sigint_callback is not None:
            self.add_callback(self.sigint_callback)
        self.add_callback(_SparsityGuard(self))
        self.add_callback(CheckpointTiming(self))
        # The one pass over the weights before training: the model is not sharded yet, so nothing is gathered.
        if masks is None:
            masks = linear_block_masks(self.model, self.block_size)
        else:
            self._check_given_masks(masks)
        self.masks: Dict[str, torch.Tensor] = {name: mask.cpu() for name, mask in masks.items()}
        self.distill = distill if distill is not None or teacher is None else DistillConfig()
        self.teacher = None if teacher is None else self._place_teacher(teacher)

    def create_accelerator_and_postprocess(self):
        """Under DDP, gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view) rather than a
        second copy of them: one gradient's worth of memory less per GPU (13.5 GB on a 7B model in bf16), which the
        memory plan turns into a larger micro-batch or no checkpointing. SparseAdamW and its clipping only read
        the gradients (the compiled backends scale them in place), which views allow."""
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedDataParallelKwargs

        if self.accelerator.ddp_handler is None:
            self.accelerator.ddp_handler = DistributedDataParallelKwargs()
        self.accelerator.ddp_handler.gradient_as_bucket_view = True
        if self.sharded_step:
            # No DDP: accelerate prepares the model as for evaluation (autocast), never wrapping it, and leaves it
            # where it is: ShardedSparseAdamW moved its weights into buffers on that device (the Trainer placed the
            # model when it was made), and a .to() onto "cpu:0" would copy them out of the CPU ones.
            prepare_model = self.accelerator.prepare_model

            def prepare_unwrapped(model, device_placement=None, evaluation_mode=False):
                return prepare_model(model, device_placement=False, evaluation_mode=True)

            self.accelerator.prepare_model = prepare_unwrapped

    @property
    def sharded_step(self) -> bool:
        """Whether the ranks run ShardedSparseAdamW instead of DDP."""
        return self.data_parallel == "sharded"

    # ---------------------------------------------------------------------------------------- distillation
    def _place_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        check_teacher(self.model, teacher, self.distill)
        freeze_teacher(teacher)
        self._teacher_sharded = False
        if self.fsdp_version is None:
            teacher.to(self.args.device)
        return teacher

    def _shard_teacher(self) -> None:
        """FSDP2: shard the teacher like the student (each decoder layer, then the root), once the process group
        exists; each rank then holds 1/world of it and gathers a layer at a time."""
        if self._teacher_sharded or self.fsdp_version != 2:
            return
        shard_teacher(self.teacher)
        self._teacher_sharded = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not self.distill.uses_teacher or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._shard_teacher()
        # As the Trainer treats a model's own loss: normalized by the accumulated batch's target tokens only when the
        # model takes num_items_in_batch (else the Trainer divides by the accumulation steps itself).
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = distill_loss(model, self.teacher, inputs, self.distill, items)
        if getattr(self.args, "average_tokens_across_devices", False) and items is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients; items counts them all
        return loss

    # --------------------------------------------------------------------------------------- the optimizer
    def _check_given_masks(self, masks: Dict[str, torch.Tensor]) -> None:
        """Given masks must name parameters of the model, fit their shapes, and agree with their zeros."""
        check_given_masks(dict(self.model.named_parameters()), masks, self.block_size, self.masks_file or "masks")

    @property
    def fsdp_version(self) -> Optional[int]:
        """1 or 2 when the Trainer runs FSDP through accelerate, else None."""
        if not self.is_fsdp_enabled:
            return None
        return int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1))

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            params = dict(opt_model.named_parameters())
            # FSDP2: the Trainer creates the optimizer on the whole parameters, then accelerate shards the model and
            # swaps the optimizer's parameters for the DTensor shards (fsdp2_switch_optimizer_parameters). State
            # kept under the old parameters would be lost (and would pin the whole model in memory), so the masks
            # are set after the swap, by name (_bind_fsdp_masks).
            self._fsdp_masks_pending = self.fsdp_version == 2 and not any(is_dtensor(p) for p in params.values())
            masks = {} if self._fsdp_masks_pending else self.masks
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = [
                {"params": [], "param_names": [], "weight_decay": self.args.weight_decay},
                {"params": [], "param_names": [], "weight_decay": 0.0},
            ]
            for name, p in params.items():
                if p.requires_grad:
                    group = groups[0] if name in decay else groups[1]
                    group["params"].append(p)
                    group["param_names"].append(name)
            sharded = dict(model=opt_model, forward_groups=forward_groups(opt_model)) if self.sharded_step else {}
            self.optimizer = (ShardedSparseAdamW if self.sharded_step else SparseAdamW)(
                [g for g in groups if g["params"]],
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay,
                block_size=self.block_size,
                impl=self.optimizer_impl,
                state_dtype=self.state_dtype,
                seed=self.args.seed,  # bf16 params: the stochastic rounding follows the run's seed
                **sharded,
            )
            # Only the weights that train take masks (masked LoRA wraps the frozen ones: their names moved)
            masks = {params[n]: m.to(params[n].device) for n, m in masks.items()
                     if n in params and params[n].requires_grad}
            if masks:
                self.optimizer.set_masks(masks, check=False)  # derived from these weights, or checked against them
        optimizer = self.sparse_optimizer
        if optimizer is not None and self._step_hook is None:
            self._step_hook = optimizer.register_step_pre_hook(self.snapshots.wait_for_copies)
        return self.optimizer

    def _bind_fsdp_masks(self, required: bool = False) -> None:
        """FSDP2: give the sharded parameters their masks once accelerate has swapped them into the optimizer.

        The masks are self.masks, taken from the whole parameters before sharding, so every rank sets the same masks
        without a gather. A no-op when nothing is pending or the parameters are not sharded yet (then, with
        `required`, an error).
        """
        optimizer = self.sparse_optimizer
        if not self._fsdp_masks_pending or optimizer is None:
            return
        params = [(name, p, group) for group in optimizer.param_groups
                  for name, p in zip(group["param_names"], group["params"])]
        if not any(is_dtensor(p) for _, p, _ in params):
            if required:
                raise RuntimeError("FSDP2 is enabled but the optimizer's parameters were never sharded: SparseTrainer "
                                   "sets the block masks on the DTensor shards that accelerate.prepare swaps in")
            return
        current = {id(p) for _, p, _ in params}
        for old in [q for q in optimizer.state if id(q) not in current]:
            if optimizer.state[old]:
                raise RuntimeError("FSDP2: the optimizer holds state for a parameter that accelerate swapped out")
            del optimizer.state[old]  # an empty entry would pin the whole unsharded parameter in memory
        masks = {p: self.masks[name].to(p.device) for name, p, _ in params if name in self.masks}
        optimizer.set_masks(masks, check=False)
        self._fsdp_masks_pending = False

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The Trainer creates the scheduler right after accelerator.prepare: under FSDP2 the shards are in place.
        self._bind_fsdp_masks()
        return super().create_scheduler(num_training_steps, optimizer)

    @property
    def sparse_optimizer(self) -> Optional[SparseAdamW]:
        return _sparse_optimizer(self.optimizer)

    def optimizer_masks(self) -> Dict[str, torch.Tensor]:
        """{name: bool mask on the CPU} as the optimizer holds them: self.masks, or after a resume the checkpoint's."""
        optimizer = self.sparse_optimizer
        if optimizer is None:
            return {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: s["block_mask"].cpu() for p, s in optimizer.state.items() if "block_mask" in s}

    def verify_sparsity(self, when: str = "") -> int:
        """Raise SparsityViolation if a pruned block holds a nonzero; returns how many parameters were checked."""
        optimizer = self.sparse_optimizer
        if optimizer is None:
            return 0
        self._synchronize_weights()
        names = {id(p): n for n, p in self.model.named_parameters()}
        return verify_block_sparsity(optimizer, names, when)

    # ---------------------------------------------------------------------------------- training and saving
    @property
    def interrupted(self) -> bool:
        """True when the last train() stopped early on Ctrl+C (after saving a checkpoint)."""
        return self.sigint_callback is not None and self.sigint_callback.stopped_at is not None

    def train(self, *args, **kwargs):
        try:
            output = super().train(*args, **kwargs)
            self.checkpoint_writer.wait()  # the last checkpoint is complete before anything else is written
        finally:  # on_train_end does not run when training raises (TrainingAborted included)
            if self.sigint_callback is not None:
                self.sigint_callback.uninstall()
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, StepLogCallback):
                    callback.close()  # the progress line and the streams it swapped
        self.verify_sparsity("at the end of training")
        return output

    def _synchronize_weights(self) -> None:
        """ShardedSparseAdamW: the peers' latest weights have landed here (before reading them outside a forward)."""
        optimizer = self.sparse_optimizer
        if isinstance(optimizer, ShardedSparseAdamW):
            optimizer.synchronize()

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = self.sparse_optimizer
        if isinstance(optimizer, ShardedSparseAdamW):
            # The gradients travel once per optimizer step: on the micro-step that the Trainer syncs.
            optimizer.push_gradients = self.accelerator.sync_gradients
        return super().training_step(model, inputs, num_items_in_batch)

    # ----------------------------------------------------------------------------------- clipping and loading
    def _clip_grad_norm(self, model):
        """Clip by the norm of the live blocks (SparseAdamW.clip_grad_norm_): NaN or inf in a pruned block's
        gradient, which SparseAdamW never reads, would make torch's whole-gradient norm NaN, and with it every
        weight. The step applies the coefficient as it reads the gradients: no pass rewrites them."""
        optimizer = self.sparse_optimizer
        if optimizer is None:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16: what accelerator.clip_grad_norm_ does first
        return optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        # Without clipping (max_grad_norm 0), the logged grad_norm is the live blocks' norm too.
        optimizer = self.sparse_optimizer
        if grad_norm is None and optimizer is not None:
            self.accelerator.unscale_gradients()
            grad_norm = optimizer.grad_norm()
        return super()._get_grad_norm(model, grad_norm)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint of a model with tied weights (tie_word_embeddings) holds one of each tied pair: the other is
        # "missing" but was loaded through its partner. Warn about the other missing keys only.
        missing = [k for k in load_result.missing_keys if not self._loaded_through_tie(k, load_result.missing_keys)]
        if not self.frozen_in_checkpoints:  # the frozen weights are the model's own, not the checkpoint's
            frozen = {n for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if not p.requires_grad}
            missing = [k for k in missing if k not in frozen]
        if len(missing) != len(load_result.missing_keys) and hasattr(load_result, "_replace"):  # a namedtuple
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)

    def _loaded_through_tie(self, key: str, missing) -> bool:
        """Whether parameter `key` is tied to a parameter that was loaded (the same tensor under another name)."""
        model = self.accelerator.unwrap_model(self.model)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        partners = [source for target, source in tied.items() if target == key]
        partners += [target for target, source in tied.items() if source == key]
        try:
            param = model.get_parameter(key)
            return any(p not in missing and model.get_parameter(p) is param for p in partners)
        except AttributeError:  # not a parameter (a buffer, or a name the model does not have)
            return False
