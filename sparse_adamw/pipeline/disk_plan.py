"""The disk plan: the output folder's high-water mark, counted before anything loads, against the free space there.

`plan_disk` counts it from the model's parameter shapes (its config, instantiated on the meta device), the prune
step's masks, the weights' and states' dtypes and how the processes share the work. It follows the run: a checkpoint
every save_steps written beside the ones kept (checkpoints.py deletes an older one only once a newer one is
complete), then the final model beside what is kept. `disk_refusal` is the one message that stops a run that does
not fit, before loading.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .run_folder import checkpoint_dirs, folder_size, format_size


@dataclass
class DiskPlan:
    """The output folder's high-water mark for a run, against the free space on its file system."""

    output_dir: Path
    weights: int  # bytes of the weights as a checkpoint and the final model hold them
    optimizer: int  # optimizer.pt (or the ranks' optimizer files)
    small: int  # config, tokenizer, scheduler, RNG states, trainer state, masks
    checkpoint: int  # one checkpoint
    final: int  # the final model
    high_water: int  # the most the folder holds at once
    peak_when: str  # what it holds then
    present: int  # bytes in the folder now
    free: Optional[int]  # free bytes on its file system; None where the folder's disk cannot be found
    notes: List[str] = field(default_factory=list)

    @property
    def needed(self) -> int:
        """Bytes the run still has to add to the folder at its peak."""
        return max(0, self.high_water - self.present)

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free

    def describe(self) -> str:
        free = "free space unknown" if self.free is None else f"{format_size(self.free)} free there"
        return (f"at most {format_size(self.high_water)} in {self.output_dir} ({self.peak_when}); {free}"
                + "".join(f"; {note}" for note in self.notes))


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the file system that holds `path` (or the nearest folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def peak_of(checkpoint: int, final: int, *, keep: Optional[int], save_steps: Optional[int], max_steps: Optional[int],
            start_step: int, present_checkpoints: int, checkpoint_at_end: bool) -> Tuple[int, str]:
    """The most bytes the run's checkpoints and final model take at once, and what they are then.

    Follows the run: a checkpoint every `save_steps` steps after `start_step` (None: none), written beside the
    ones kept, which are trimmed to `keep` once it is complete; at `max_steps` (None: unknown, so as many
    checkpoints as can be), a last checkpoint only with `checkpoint_at_end`, then the final model beside the kept
    ones.
    """
    held, peak, when = present_checkpoints, present_checkpoints * checkpoint, "what it holds now"
    if save_steps:
        if max_steps is None:
            writes = (keep or 1) + 1  # enough to reach the steady state
        else:
            writes = max(0, (max_steps - 1) // save_steps - start_step // save_steps)
        writes += int(checkpoint_at_end)
        for _ in range(writes):
            if (held + 1) * checkpoint > peak:
                peak, when = (held + 1) * checkpoint, _checkpoints(held + 1, checkpoint)
            held = held + 1 if keep is None else min(held + 1, keep)
    if held * checkpoint + final > peak:
        peak = held * checkpoint + final
        when = (f"{_checkpoints(held, checkpoint)} and " if held else "") + f"the final model, {format_size(final)}"
    return peak, when


def _checkpoints(n: int, size: int) -> str:
    return f"{n} checkpoint{'s' if n != 1 else ''} of {format_size(size)}" + (
        ": the newest complete one and the one being written" if n == 2 else "")


def config_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: shape} of a causal LM of this config, instantiated on the meta device (nothing allocated;
    tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


def model_shapes(model: str) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: shape} of a saved model, from its config: nothing is loaded."""
    from transformers import AutoConfig

    from .models import DEFAULT_MODEL, default_model_path

    path = default_model_path() if model == DEFAULT_MODEL else Path(model)
    config = (AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name) if path.suffix == ".gguf"
              else AutoConfig.from_pretrained(str(path)))
    return config_shapes(config)


def adapter_shapes(shapes: Dict[str, Tuple[int, ...]], r: int, target_modules) -> Dict[str, Tuple[int, ...]]:
    """The masked LoRA adapters' parameter shapes (--lora, lora.py) for a model with these parameter shapes: A
    [r, in] and B [out, r] for each 2-D weight `<...>.<target>.weight`."""
    out = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) == 2 and parts[-1] == "weight" and len(parts) > 1 and parts[-2] in target_modules:
            out[f"{'.'.join(parts[:-1])}.lora_A"] = (r, shape[1])
            out[f"{'.'.join(parts[:-1])}.lora_B"] = (shape[0], r)
    return out


def plan_disk(output_dir, model: Optional[str], *, dtype: torch.dtype, state_dtype: torch.dtype,
              masks_file: Optional[str], world_size: int, mode: Optional[str], save_steps: Optional[int],
              max_steps: Optional[int], keep: Optional[int], checkpoint_at_end: bool, start_step: int = 0,
              present_checkpoints: int = 0, fsdp_fp32_weights: bool = False,
              shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
              adapters: Optional[Dict[str, Tuple[int, ...]]] = None) -> DiskPlan:
    """The disk plan of a fine-tune of `model` (or of a model with these parameter `shapes`; module docstring).
    `mode`: None (one process), "ddp", "sharded" or "fsdp". `adapters`: the shapes of the masked LoRA adapters
    (adapter_shapes) when only they train: the checkpoints hold them and their state, the end adds them
    beside the merged model."""
    from ..masks import load_masks

    shapes = model_shapes(model) if shapes is None else shapes
    masks, block, notes = {}, (16, 16), []
    if masks_file and Path(masks_file).is_file():
        masks, block = load_masks(masks_file)
    elif masks_file is None:
        notes.append("optimizer state counted dense (no block masks file to count the live blocks from)")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    item = torch.empty((), dtype=dtype).element_size()
    state_item = torch.empty((), dtype=state_dtype).element_size()
    live = {name: int(masks[name].sum()) * block[0] * block[1] if name in masks else n for name, n in numel.items()}
    weights = sum(numel.values()) * item
    optimizer = 2 * state_item * sum(live.values())
    optimizer += sum(int(m.numel()) for m in masks.values())  # the masks travel with the state, a byte a block
    small = _small_files(model)  # config and tokenizer, in every checkpoint and the final model
    # + each process's RNG state, the scheduler, the trainer state and the training arguments (a few kB each)
    checkpoint = weights + optimizer + small + 16 * 1024 * (max(1, world_size) + 1)
    adapter = 0
    if adapters is not None:
        adapter_numel = sum(math.prod(shape) for shape in adapters.values())
        adapter, optimizer = adapter_numel * item, 2 * state_item * adapter_numel
        checkpoint = adapter + optimizer + small + 16 * 1024 * (max(1, world_size) + 1)
        # the adapter beside the merged model: its weights, its masks and its config
        adapter += sum(int(m.numel()) for m in masks.values()) + 4 * 1024
    if mode == "fsdp":
        # The gathered model twice (model.safetensors and accelerate's own copy), in fp32 under bf16 autocast.
        fsdp_weights = sum(numel.values()) * (4 if fsdp_fp32_weights else item)
        checkpoint += 2 * fsdp_weights - weights
        weights = fsdp_weights
        notes.append("FSDP2's layout is estimated, not measured")
    # + the trainer state, the run's record and its report
    final = weights + small + sum(int(m.numel()) for m in masks.values()) + 16 * 1024 + adapter
    peak, when = peak_of(checkpoint, final, keep=keep, save_steps=save_steps, max_steps=max_steps,
                         start_step=start_step, present_checkpoints=present_checkpoints,
                         checkpoint_at_end=checkpoint_at_end)
    output_dir = Path(output_dir)
    present = folder_size(output_dir) if output_dir.is_dir() else 0
    return DiskPlan(output_dir, weights, optimizer, small, checkpoint, final, peak, when, present,
                    free_bytes(output_dir), notes)


def disk_plan(plan) -> Optional[DiskPlan]:
    """plan_disk for a fine-tune's resolved Plan (finetune_config.py), before anything is loaded; None when the model
    is not there yet (the prune step makes it)."""
    from .models import DEFAULT_MODEL, resolve_dtype

    a, t = plan.args, plan.training
    if not Path(a.model).exists() and a.model != DEFAULT_MODEL:
        return None
    strategy = str(t.get("save_strategy", "steps")).rsplit(".", 1)[-1].lower()
    save_steps, max_steps = t["save_steps"], (t["max_steps"] if t["max_steps"] > 0 else None)
    if strategy == "no":
        save_steps = None
    elif strategy != "steps" or save_steps < 1:  # per epoch, or a fraction of the run: cadence unknown here
        save_steps, max_steps = 1, None
    else:
        save_steps = int(save_steps)
    mode = "fsdp" if t.get("fsdp") else None if plan.world_size == 1 else a.data_parallel
    adapters = None if plan.lora is None else adapter_shapes(model_shapes(a.model), plan.lora.r,
                                                             plan.lora.target_modules)
    return plan_disk(t["output_dir"], a.model, dtype=resolve_dtype(a.dtype), state_dtype=resolve_dtype(a.state_dtype),
                     masks_file=a.masks_file, world_size=plan.world_size, mode=mode, save_steps=save_steps,
                     max_steps=max_steps, keep=t.get("save_total_limit"), checkpoint_at_end=a.keep_checkpoints,
                     start_step=plan.status.resume_step,
                     present_checkpoints=len(checkpoint_dirs(t["output_dir"])) if plan.resume_from else 0,
                     fsdp_fp32_weights=bool(t.get("bf16")), adapters=adapters)


def describe_disk_plan(plan) -> str:
    """The banner's line: the estimate, or why there is none."""
    try:
        disk = disk_plan(plan)
    except (OSError, ValueError) as err:
        return f"not estimated ({err})"
    if disk is None:
        return "estimated once the prune step has made the model"
    return disk.describe() + ("" if disk.fits else " -- DOES NOT FIT")


def _small_files(model: Optional[str]) -> int:
    """Bytes of the tokenizer and config files next to a saved model (what every checkpoint copies)."""
    path = Path(model or "")
    if model is None or not path.is_dir():
        return 16 * 1024 * 1024  # a .gguf model: its tokenizer, written out, is a few MB
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".model", ".txt")
               and not p.name.endswith(".index.json"))


def disk_refusal(plan: DiskPlan, *, checkpoints: bool, state_dtype: torch.dtype, keep: Optional[int]) -> str:
    """The one message that stops a run whose output folder's disk cannot hold it: needed, free, and the flags that
    lower the need."""
    ways = []
    if checkpoints and keep is not None and keep > 1:
        ways.append(f"--save_total_limit 1 ({format_size(2 * plan.checkpoint)} at the peak)")
    if state_dtype == torch.float32:
        ways.append("--state_dtype bfloat16 (half the optimizer state)")
    if checkpoints:
        ways.append(f"--save_strategy no (no checkpoints: {format_size(plan.final)}, but nothing to resume from "
                    "after a crash)")
    ways.append("--output_dir on a larger disk")
    return (f"the run needs {format_size(plan.needed)} more in {plan.output_dir} at its peak ({plan.peak_when}), "
            f"and {format_size(plan.free)} is free there. Lower it with " + ", or ".join(ways)
            + "; --skip_disk_check starts anyway")
