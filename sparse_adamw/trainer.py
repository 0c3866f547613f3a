"""Full fine-tuning of a block-pruned model with SparseAdamW inside a Hugging Face Trainer.

`SparseTrainer` is a `transformers.Trainer` that
- creates SparseAdamW with the Trainer's usual param groups (no weight decay on biases and norms) and block masks
  derived from the pruned model when training starts (or loaded from the prune step's `block_masks.pt`);
- checks that every pruned block is still exactly zero when training starts (after a resume too), at every save
  and at the end, and raises `SparsityViolation` otherwise;
- turns the first Ctrl+C (SIGINT) into a checkpoint at the end of the current optimizer step and a clean stop
  (`trainer.interrupted` is then True); a second Ctrl+C aborts at once. Rerunning with
  `trainer.train(resume_from_checkpoint=...)` restores the optimizer state exactly: masks, m, v and step all
  travel in the checkpoint's optimizer.pt.

    from sparse_adamw.trainer import SparseTrainer

    trainer = SparseTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    trainer.train()                      # or: masks_file="pruned_model/block_masks.pt"

SparseAdamW also works in a plain Trainer; pass it through `optimizers` (the Trainer then builds only the
scheduler). Group the parameters yourself; here 1-D parameters (norms, biases) get no weight decay:

    from transformers import Trainer
    from sparse_adamw import SparseAdamW
    from sparse_adamw.trainer import SigintCheckpointCallback

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
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()             # pruned blocks are neither read nor written
            optimizer.zero_grad(set_to_none=True)
    torch.save(optimizer.state_dict(), "optimizer.pt")   # masks, m, v and step; load_state_dict restores them

Gradients of pruned blocks are not masked (that would cost a pass over every gradient); they count in the
clipping norm, which only rescales the whole step. SparseTrainer runs in one process or under DDP (torchrun).
The Trainer's FSDP and DeepSpeed paths are refused for now: SparseAdamW itself updates FSDP2 (fully_shard) row
shards, but SparseTrainer does not yet derive and check masks on sharded parameters.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from transformers import Trainer, TrainerCallback

from .masks import BlockSize, block_grid, block_mask_from_zeros, normalize_block_size
from .optimizer import SparseAdamW

__all__ = [
    "SigintCheckpointCallback",
    "SparseTrainer",
    "SparsityViolation",
    "StepLogCallback",
    "linear_block_masks",
    "verify_block_sparsity",
]


class SparsityViolation(RuntimeError):
    """A block that the masks mark pruned holds a nonzero."""


@torch.no_grad()
def linear_block_masks(model: torch.nn.Module, block_size: BlockSize = 16) -> Dict[str, torch.Tensor]:
    """{parameter name: bool block mask} for every nn.Linear weight with at least one all-zero block.

    These are the weights that pruning zeroes and `check_sparsity` counts; embeddings, norms and dense weights get
    no mask (plain AdamW).
    """
    block = normalize_block_size(block_size)
    masks = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dim() == 2:
            mask = block_mask_from_zeros(module.weight, block)
            if not bool(mask.all()):
                masks[f"{module_name}.weight" if module_name else "weight"] = mask
    return masks


@torch.no_grad()
def verify_block_sparsity(optimizer: SparseAdamW, names: Optional[Dict[int, str]] = None, when: str = "") -> int:
    """Raise SparsityViolation if any block that `optimizer`'s masks mark pruned holds a nonzero.

    `names` maps id(param) to a name for the message. Returns the number of masked parameters checked.
    """
    bad, checked = [], 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            mask = optimizer.state.get(p, {}).get("block_mask")
            if mask is None:
                continue
            checked += 1
            leaked = int((block_mask_from_zeros(p, group["block_size"]) & ~mask.to(p.device)).sum())
            if leaked:
                name = (names or {}).get(id(p), f"parameter of shape {tuple(p.shape)}")
                bad.append(f"{name}: {leaked} of {int((~mask).sum())} pruned blocks")
    if bad:
        where = f" {when}" if when else ""
        raise SparsityViolation(f"pruned blocks became nonzero{where}: " + "; ".join(bad[:10])
                                + (f"; and {len(bad) - 10} more parameters" if len(bad) > 10 else ""))
    return checked


def _sparse_optimizer(optimizer) -> Optional[SparseAdamW]:
    """The SparseAdamW inside accelerate's AcceleratedOptimizer (or the optimizer itself), else None."""
    while optimizer is not None and not isinstance(optimizer, SparseAdamW):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class SigintCheckpointCallback(TrainerCallback):
    """First Ctrl+C: save a checkpoint at the end of the current optimizer step and stop; second: abort.

    The checkpoint goes through the Trainer's normal path (control.should_save), so it holds the model, the
    optimizer and scheduler states, the RNG states and trainer_state.json, and `resume_from_checkpoint` continues
    from it. Under DDP the ranks agree on the stop step (one all-reduce of a flag per optimizer step), so a signal
    that reaches them at slightly different times cannot leave one rank waiting for the others. The handler is
    installed at on_train_begin and removed at on_train_end (SparseTrainer also removes it if training raises).
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: Optional[int] = None
        self._previous = None

    def install(self) -> None:
        self.requested = False
        self.stopped_at = None
        if threading.current_thread() is threading.main_thread() and self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            if signal.getsignal(signal.SIGINT) == self._handle:
                signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        # A second Ctrl+C gets whatever was there before (normally KeyboardInterrupt).
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        if os.environ.get("RANK", "0") == "0":
            print("\nCtrl+C: saving a checkpoint at the end of this step, then stopping "
                  "(press Ctrl+C again to abort without saving)", file=sys.stderr, flush=True)

    def _agreed(self, args) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()


class StepLogCallback(TrainerCallback):
    """Prints `Step 10: loss=2.5432` at every logging step (main process), then the learning rate and timing."""

    def __init__(self):
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            now, step = time.perf_counter(), state.global_step
            extra = []
            if "learning_rate" in logs:
                extra.append(f"lr {logs['learning_rate']:.3g}")
            if self._last is not None and step > self._last[1]:
                per_step = (now - self._last[0]) / (step - self._last[1])
                extra.append(f"{per_step:.2f} s/step")
                if state.max_steps > step:
                    extra.append(f"{_duration((state.max_steps - step) * per_step)} left")
            self._last = (now, step)
            print(f"Step {step}: loss={logs['loss']:.4f}" + (f"  ({', '.join(extra)})" if extra else ""), flush=True)
        elif "train_runtime" in logs:
            print(f"Training: {state.global_step} steps in {_duration(logs['train_runtime'])}, "
                  f"mean loss {logs.get('train_loss', float('nan')):.4f}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _SparsityGuard(TrainerCallback):
    """Checks the masks once the optimizer (and, on resume, its saved state) is in place."""

    def __init__(self, trainer: "SparseTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.verify_sparsity("at the start of training")


class SparseTrainer(Trainer):
    """A transformers.Trainer that fine-tunes a block-pruned model with SparseAdamW and keeps it pruned.

    Args (besides the Trainer's own):
        masks: {parameter name: bool block mask (True = live)}; default: `linear_block_masks(model)`, the
            all-zero blocks of every nn.Linear weight when the optimizer is created.
        masks_file: a `block_masks.pt` written by `python -m sparse_adamw.prune` (or prune.save_masks); its
            block shape wins over `block_size`. Mutually exclusive with `masks`.
        block_size: block shape of the masks, int or (bh, bw); default 16.
        optimizer_impl: SparseAdamW's `impl` ("auto", "torch", "triton").
        state_dtype: SparseAdamW's `state_dtype` (None = fp32, or torch.bfloat16).
        handle_sigint: install SigintCheckpointCallback (default True).

    The optimizer uses args.learning_rate, adam_beta1/2, adam_epsilon, weight_decay and seed (for the stochastic
    rounding of bf16 weights); `args.optim` is ignored. Given masks are checked against the model right away
    (ValueError for unknown names or shapes, SparsityViolation for nonzeros in blocks they mark pruned).
    If `optimizers=(optimizer, scheduler)` is passed, the optimizer must be a SparseAdamW.
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
        **kwargs,
    ):
        if masks is not None and masks_file is not None:
            raise ValueError("pass either masks or masks_file, not both")
        self.block_size = normalize_block_size(block_size)
        if masks_file is not None:
            from .prune import load_masks

            masks, self.block_size = load_masks(masks_file)
        self._given_masks = masks
        self.masks_file = None if masks_file is None else str(masks_file)
        self.optimizer_impl = optimizer_impl
        self.state_dtype = state_dtype
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "SparseTrainer supports one process or DDP (torchrun), not yet the Trainer's FSDP or DeepSpeed: "
                "it derives and checks masks on whole parameters. SparseAdamW itself takes FSDP2 (fully_shard) "
                "parameters in a loop of your own"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, SparseAdamW):
            raise TypeError(f"SparseTrainer needs a SparseAdamW optimizer, got {type(self.optimizer).__name__}")
        self.sigint_callback = SigintCheckpointCallback() if handle_sigint else None
        if self.sigint_callback is not None:
            self.add_callback(self.sigint_callback)
        self.add_callback(_SparsityGuard(self))
        if self._given_masks is not None:
            self._check_given_masks()

    # --------------------------------------------------------------------------------------- the optimizer
    def _check_given_masks(self) -> None:
        """Given masks must name parameters of the model, fit their shapes, and agree with their zeros."""
        params = dict(self.model.named_parameters())
        source = self.masks_file or "masks"
        unknown = sorted(set(self._given_masks) - set(params))
        if unknown:
            raise ValueError(f"{source} names {len(unknown)} parameter(s) the model does not have, e.g. "
                             f"{unknown[:3]}; was it made for another model?")
        leaked = []
        for name, mask in self._given_masks.items():
            p = params[name]
            expected = block_grid(p.shape, self.block_size) if p.dim() == 2 else None
            if expected is None or tuple(mask.shape) != expected:
                raise ValueError(f"{source}: the mask of {name} has shape {tuple(mask.shape)}, but the parameter "
                                 f"{tuple(p.shape)} in {self.block_size[0]}x{self.block_size[1]} blocks needs "
                                 f"{expected}")
            n = int((block_mask_from_zeros(p, self.block_size) & ~mask.to(p.device)).sum())
            if n:
                leaked.append(f"{name}: {n} blocks")
        if leaked:
            raise SparsityViolation(f"the model has nonzeros in blocks that {source} marks pruned (is it the "
                                    f"model those masks were made for?): " + "; ".join(leaked[:10]))

    def block_masks(self, model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
        """{name: mask} for `model` (default self.model): the given masks, else derived from its zero blocks."""
        model = self.model if model is None else model
        if self._given_masks is not None:
            return dict(self._given_masks)
        return linear_block_masks(model, self.block_size)

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            params = dict(opt_model.named_parameters())
            masks = self.block_masks(opt_model)
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
            self.optimizer = SparseAdamW(
                [g for g in groups if g["params"]],
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay,
                masks={params[n]: m.to(params[n].device) for n, m in masks.items() if params[n].requires_grad},
                block_size=self.block_size,
                impl=self.optimizer_impl,
                state_dtype=self.state_dtype,
                seed=self.args.seed,  # bf16 params: the stochastic rounding follows the run's seed
            )
        return self.optimizer

    @property
    def sparse_optimizer(self) -> Optional[SparseAdamW]:
        return _sparse_optimizer(self.optimizer)

    def verify_sparsity(self, when: str = "") -> int:
        """Raise SparsityViolation if a pruned block holds a nonzero; returns how many parameters were checked."""
        optimizer = self.sparse_optimizer
        if optimizer is None:
            return 0
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
        finally:
            if self.sigint_callback is not None:
                self.sigint_callback.uninstall()
        self.verify_sparsity("at the end of training")
        return output

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        # Every checkpoint and the final save pass through here: never write a model that lost its sparsity.
        self.verify_sparsity(f"before saving to {output_dir or self.args.output_dir}")
        super().save_model(output_dir, _internal_call)
