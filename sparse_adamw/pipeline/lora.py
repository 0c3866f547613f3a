"""Masked LoRA: an adapter whose merge keeps every pruned block of the frozen pruned weight exactly zero.

A plain LoRA adapter learns W + (B·A)·scale; its merge is dense, so the blocks the pruning zeroed fill in. Here each
adapted Linear computes

    y = x Wᵀ + dropout(x) Δᵀ,    Δ = M ⊙ (B·A) · scale,

with M the weight's block mask (expanded to its shape). W is frozen; A [r, in] and B [out, r] train (B starts at
zero, as PEFT's does, so the adapted model starts as the pruned one). Merging writes W + Δ: a pruned block is zero
in W and in M, so it stays exactly zero, and the merged model computes what the adapted one did.

Memory: Δ has the weight's size. `MaskedDelta` makes it for the forward product and drops it; the backward makes
it again (for the gradient of x) and forms the weight-sized gradient of Δ only there. The module keeps the block
mask (one bool per 16x16 block) and expands it for each product. Nothing weight-sized is kept between the forward
and the backward of a layer, so at 7B the adapters add no weight-sized tensor per layer.

In the fine-tune (`--lora`): the pruned model is frozen and every decoder Linear named by --lora_target_modules
gets an adapter; SparseTrainer trains the adapters only, with SparseAdamW (no masks: A and B are dense), and its
checkpoints hold the adapters and their optimizer state, not the frozen weights. At the end the adapters are merged
into a plain Hugging Face model (the output folder, as a full fine-tune leaves it) and also saved in PEFT's adapter
format under `adapter/`: adapter_config.json and adapter_model.safetensors, with the block masks beside them
(block_masks.pt). PEFT can load that adapter, but its LoRA layers add B·A unmasked (the merge fills the pruned
blocks in): `load_masked_adapter` applies it as trained.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import MASKS_FILE, BlockSize, block_grid, expand_block_mask, load_masks, \
    normalize_block_size, pruned_block_leaks, save_masks
from ..sparsity import SparsityViolation, check_given_masks, check_sparsity, linear_block_masks, pruned_fraction

ADAPTER_DIR = "adapter"  # in the output folder: beside the merged model, whose from_pretrained it must not redirect
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's keys: base_model.model.<module>.lora_A.weight
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a LLaMA decoder's
DEFAULT_R = 16
DEFAULT_ALPHA_PER_R = 2.0  # alpha = 2 r: scale 2, a common choice
DEFAULT_DROPOUT = 0.05
DEFAULT_LEARNING_RATE = 2e-4  # your own model: the common LoRA rate
# The packaged model, measured (benchmarks/RESULTS.md, "Masked LoRA"): 3 epochs on one H100, rank 16, distilled,
# recovered 76.8% at 5e-4, 80.7% at 1e-3 (two seeds), 84.4% at 2e-3. The CPU demo's 40 steps: 1e-3 against 2e-4.
PACKAGED_LEARNING_RATE = 2e-3
CPU_LEARNING_RATE = 1e-3


def _masked(product: torch.Tensor, block_mask: torch.Tensor, block: Tuple[int, int], scale: float) -> torch.Tensor:
    """product ⊙ M · scale, in place, M expanded from the block mask for this product only."""
    product.mul_(expand_block_mask(block_mask, product.shape, block))
    return product if scale == 1.0 else product.mul_(scale)


class MaskedDelta(torch.autograd.Function):
    """x Δᵀ with Δ = M ⊙ (B·A) · scale, Δ recomputed in backward instead of kept. (custom_fwd/custom_bwd: under
    autocast the backward recomputes in the forward's dtypes.)"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, lora_a, lora_b, block_mask, block: Tuple[int, int], scale: float):
        ctx.save_for_backward(x, lora_a, lora_b, block_mask)
        ctx.block, ctx.scale = block, scale
        return F.linear(x, _masked(lora_b @ lora_a, block_mask, block, scale))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, lora_a, lora_b, block_mask = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _masked(lora_b @ lora_a, block_mask, block, scale)
        # dL/dΔ = gᵀx; through the mask and the scale, then through B·A
        grad_delta = _masked(grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]), block_mask,
                             block, scale)
        grad_a = lora_b.t() @ grad_delta if ctx.needs_input_grad[1] else None
        grad_b = grad_delta @ lora_a.t() if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None, None


class MaskedFrozenLinear(torch.autograd.Function):
    """x (M ⊙ W)ᵀ for a frozen W that holds the dense weights (shared with the teacher): M ⊙ W is made for the
    product, and again in backward for the gradient of x, never kept."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, block_mask, block: Tuple[int, int]):
        ctx.save_for_backward(weight, block_mask)
        ctx.block = block
        return F.linear(x, _masked(weight.clone(), block_mask, block, 1.0))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        weight, block_mask = ctx.saved_tensors
        return grad_out @ _masked(weight.clone(), block_mask, ctx.block, 1.0).to(grad_out.dtype), None, None, None


class MaskedLoRALinear(nn.Module):
    """A frozen (pruned) Linear with a masked LoRA adapter (see the module docstring). With `mask_base`, the frozen
    weight is the dense one (shared with the distillation teacher, share_teacher_weights) and its pruned blocks are
    masked in each product: the student computes with the pruned weights all the same."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor, block_size: BlockSize = 16, r: int = 16,
                 alpha: float = 32.0, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"the LoRA rank must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"the LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        out_features, in_features = base.weight.shape
        bh, bw = normalize_block_size(block_size)
        if tuple(mask.shape) != block_grid(base.weight.shape, (bh, bw)):
            raise ValueError(f"a block mask of shape {tuple(mask.shape)} does not fit a weight of shape "
                             f"{tuple(base.weight.shape)} in {bh}x{bw} blocks")
        weight = base.weight
        self.block = (bh, bw)
        self.register_buffer("block_mask", mask.to(device=weight.device, dtype=torch.bool), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation of A
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mask_base = False
        self.train(base.training)  # in the mode of the model it joins (an eval-mode model must not drop out)

    def delta(self) -> torch.Tensor:
        """M ⊙ (B·A) · scale, the weight-sized change the merge adds."""
        return _masked(self.lora_B @ self.lora_A, self.block_mask, self.block, self.scale)

    def forward(self, x):
        if self.mask_base:
            base = MaskedFrozenLinear.apply(x, self.base.weight, self.block_mask, self.block)
            if self.base.bias is not None:
                base = base + self.base.bias
        else:
            base = self.base(x)
        return base + MaskedDelta.apply(self.dropout(x), self.lora_A, self.lora_B, self.block_mask, self.block,
                                        self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with M ⊙ W + Δ as its weight (in place, so a weight shared with the teacher is the merged
        one afterwards: the adapter and the teacher are spent)."""
        if self.mask_base:
            _masked(self.base.weight, self.block_mask, self.block, 1.0)
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        return self.base


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where model's submodule `name` is; returns it."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return module


def add_masked_lora(model: nn.Module, masks: Dict[str, torch.Tensor], block_size: BlockSize = 16, *,
                    target_modules: Iterable[str], r: int = 16, alpha: float = 32.0,
                    dropout: float = 0.0) -> Dict[str, MaskedLoRALinear]:
    """Freeze `model` and wrap each Linear whose name ends with one of `target_modules` (q_proj, ...) in a
    MaskedLoRALinear with its block mask (`masks` is keyed by weight name, as SparseTrainer's; a Linear without a
    mask is dense: every block live). Returns {module name: adapter}."""
    targets = tuple(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted: Dict[str, MaskedLoRALinear] = {}
    bh, bw = normalize_block_size(block_size)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name.split(".")[-1] in targets:
            continue
        mask = masks.get(f"{name}.weight")
        if mask is None:
            mask = torch.ones(block_grid(module.weight.shape, (bh, bw)), dtype=torch.bool)
        adapted[name] = _replace(model, name, MaskedLoRALinear(module, mask, (bh, bw), r=r, alpha=alpha,
                                                                dropout=dropout))
    if not adapted:
        raise ValueError(f"no Linear of the model is named by the LoRA target modules {list(targets)}")
    return adapted


@torch.no_grad()
def share_teacher_weights(student: nn.Module, teacher: nn.Module, masks: Dict[str, torch.Tensor],
                          block: Tuple[int, int], target_modules: Iterable[str]) -> Optional[str]:
    """Make the (not yet adapted) student hold the teacher's tensors, one copy for both, where that changes nothing
    the student computes: every masked weight of the student is the teacher's with the pruned blocks zeroed, and
    every other tensor is the teacher's, in the same dtype; and the target modules cover every masked weight, so
    that each is masked on the fly (MaskedLoRALinear.mask_base). Returns None when shared, else why not (the two
    copies stay)."""
    targets = set(target_modules)
    unadapted = [n for n in masks if n.split(".")[-2] not in targets]
    if unadapted:
        return f"the target modules leave pruned weights without an adapter, e.g. {unadapted[0]}"
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    ours = dict(student.named_parameters(remove_duplicate=False))
    if ours.keys() != theirs.keys():
        return "the teacher's parameters are not named as the student's"
    for name, p in ours.items():
        t = theirs[name]
        if p.shape != t.shape or p.dtype != t.dtype:
            return f"{name} differs in shape or dtype ({tuple(p.shape)} {p.dtype} vs {tuple(t.shape)} {t.dtype})"
        expected = _masked(t.detach().clone(), masks[name], block, 1.0) if name in masks else t
        if not torch.equal(p, expected):
            return f"the pruned model is not the teacher with blocks zeroed ({name} differs elsewhere)"
    for module_name, module in student.named_modules():
        partner = teacher.get_submodule(module_name)
        for key in list(module._parameters):
            if module._parameters[key] is not None:
                module._parameters[key] = partner._parameters[key]
    return None


def prepare(model: nn.Module, teacher: Optional[nn.Module], masks: Dict[str, torch.Tensor], block: Tuple[int, int],
            settings: LoraSettings, share: bool) -> Tuple[Dict[str, MaskedLoRALinear], Optional[str]]:
    """The fine-tune's LoRA model: the teacher's weights shared where `share` and share_teacher_weights allows, then
    the adapters. Returns (adapters, why the weights are not shared, or None when they are)."""
    why_not = "no teacher" if teacher is None else "--lora_separate_teacher" if not share else \
        share_teacher_weights(model, teacher, masks, block, settings.target_modules)
    adapted = add_masked_lora(model, masks, block, target_modules=settings.target_modules, r=settings.r,
                              alpha=settings.alpha, dropout=settings.dropout)
    for module in adapted.values():
        module.mask_base = why_not is None
    # Recomputed layers get inputs that need no gradient (the embeddings are frozen): make them need one, or the
    # adapters inside would get none.
    model.enable_input_require_grads()
    return adapted, why_not


def merge_masked_lora(model: nn.Module) -> Tuple[nn.Module, int]:
    """Replace every MaskedLoRALinear by its merged Linear, in place; returns (model, how many were merged)."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLoRALinear):
            _replace(model, name, module.merged())
            merged += 1
    return model, merged


# ------------------------------------------------------------------------------------- the fine-tune's flags
@dataclass
class LoraArguments:
    """The fine-tune's LoRA flags (parsed beside FinetuneArguments; resolved by `resolve`)."""

    lora: bool = field(default=False, metadata={"help": (
        "train a masked LoRA adapter on the frozen pruned model instead of every weight: W + M * (B A) * alpha / r, "
        "with M the weight's block mask, so the merged model keeps every pruned block exactly zero. The output "
        "folder holds the merged model, and the adapter in PEFT's format under adapter/")})
    lora_r: Optional[int] = field(default=None, metadata={"help": f"the adapters' rank (default {DEFAULT_R})"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": (
        f"the adapters' alpha: B A is scaled by alpha / r (default {DEFAULT_ALPHA_PER_R:g} x r)")})
    lora_dropout: Optional[float] = field(default=None, metadata={"help": (
        f"dropout on the adapters' input, in [0, 1) (default {DEFAULT_DROPOUT:g})")})
    lora_target_modules: Optional[str] = field(default=None, metadata={"help": (
        "comma-separated names of the Linear layers that get an adapter, or all-linear (default: all-linear, "
        f"{','.join(ALL_LINEAR)})")})
    lora_separate_teacher: bool = field(default=False, metadata={"help": (
        "distilling, keep the dense teacher as a second copy of the weights. By default the student and the "
        "teacher share one copy, the dense one, and the student masks its pruned blocks in each product (the "
        "same numbers, a model's memory less, a masking pass per layer more)")})


@dataclass(frozen=True)
class LoraSettings:
    """What the adapters are: part of a run's result (run_config.json)."""

    r: int
    alpha: float
    dropout: float
    target_modules: Tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def as_dict(self) -> Dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}

    def describe(self) -> str:
        return (f"rank {self.r}, alpha {self.alpha:g} (scale {self.scale:g}), dropout {self.dropout:g}, on "
                f"{','.join(self.target_modules)}")


def resolve(lora: LoraArguments) -> Optional[LoraSettings]:
    """LoraSettings for --lora (None without it); ValueError for a value out of range, or a LoRA flag without
    --lora."""
    if not lora.lora:
        given = [f"--{name}" for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                 if getattr(lora, name) is not None] + (["--lora_separate_teacher"] if lora.lora_separate_teacher
                                                        else [])
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --lora")
        return None
    r = DEFAULT_R if lora.lora_r is None else lora.lora_r
    if r < 1:
        raise ValueError(f"--lora_r must be at least 1, got {r}")
    alpha = DEFAULT_ALPHA_PER_R * r if lora.lora_alpha is None else lora.lora_alpha
    if not alpha > 0:
        raise ValueError(f"--lora_alpha must be positive, got {alpha:g}")
    dropout = DEFAULT_DROPOUT if lora.lora_dropout is None else lora.lora_dropout
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout:g}")
    names = lora.lora_target_modules or "all-linear"
    targets = ALL_LINEAR if names == "all-linear" else tuple(n.strip() for n in names.split(",") if n.strip())
    if not targets:
        raise ValueError("--lora_target_modules names no module")
    return LoraSettings(r, float(alpha), float(dropout), tuple(targets))


def check_combination(*, fsdp: bool, data_parallel: str) -> None:
    """Flags a LoRA run cannot take: ValueError, before anything loads."""
    if fsdp:
        raise ValueError("--lora does not run under --fsdp: its masked products are not written for sharded "
                         "weights, and its merge needs each weight whole. Run it without --fsdp: one GPU holds the "
                         "frozen weights once (shared with the teacher), and torchrun runs DDP")
    if data_parallel == "sharded":
        raise ValueError("--lora steps adapters of a few MB: the sharded step has nothing to share. Use "
                         "--data_parallel ddp (or auto)")


def pruned_masks(model: nn.Module, masks_file: Optional[str], block: Tuple[int, int]) -> Tuple[
        Dict[str, torch.Tensor], Tuple[int, int]]:
    """The frozen model's block masks: the prune step's file (its block shape wins), checked against the model, or
    derived from its all-zero blocks (as SparseTrainer derives them). ValueError for a file made for another model;
    SparsityViolation for a model nonzero where the file says pruned."""
    if masks_file is None:
        return linear_block_masks(model, block), block
    masks, block = load_masks(masks_file)
    check_given_masks(dict(model.named_parameters()), masks, block, str(masks_file))
    return masks, block


# --------------------------------------------------------------------------- the adapter, in PEFT's format
def adapters_of(model: nn.Module) -> Dict[str, MaskedLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLoRALinear)}


def save_adapter(model: nn.Module, folder: Union[str, Path], settings: LoraSettings,
                 base_model: Optional[str] = None) -> Path:
    """The adapters of `model` in PEFT's format (adapter_config.json, adapter_model.safetensors) and their block
    masks (block_masks.pt, keyed by the adapted weights' names), in `folder`."""
    from safetensors.torch import save_file

    adapters = adapters_of(model)
    if not adapters:
        raise ValueError("the model has no masked LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, masks, block = {}, {}, None
    for name, module in adapters.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().to("cpu").contiguous()
        masks[f"{name}.weight"] = module.block_mask
        block = module.block
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    save_masks(folder / MASKS_FILE, masks, block)
    config = {  # PEFT's LoraConfig fields for this adapter
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in adapters}), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter(folder: Union[str, Path]) -> Tuple[LoraSettings, Dict[str, torch.Tensor],
                                                   Dict[str, torch.Tensor], Tuple[int, int]]:
    """(settings, {peft key: tensor}, masks by weight name, block shape) of an adapter save_adapter wrote;
    ValueError when the folder is not one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MASKS_FILE) if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a masked LoRA adapter: it lacks {', '.join(missing)}"
                         + (" (a plain PEFT adapter carries no block masks)" if missing == [MASKS_FILE] else ""))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}, not LORA")
    settings = LoraSettings(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                            tuple(config["target_modules"]))
    masks, block = load_masks(folder / MASKS_FILE)
    return settings, load_file(str(folder / ADAPTER_WEIGHTS)), masks, block


def load_masked_adapter(model: nn.Module, folder: Union[str, Path]) -> Dict[str, MaskedLoRALinear]:
    """Wrap `model` (the pruned model the adapter was trained on) with the adapter saved in `folder`, masks and
    all; returns {module name: adapter}. ValueError when the adapter was saved for other masks (the model's
    weights are nonzero in a block its masks mark pruned, or its masks do not cover the adapted weights) or for
    another model (names or shapes)."""
    settings, tensors, masks, block = read_adapter(folder)
    leaked = pruned_block_leaks(dict(model.named_parameters()), masks, block, f"{folder}: the adapter")
    if leaked:
        raise ValueError(f"{folder}: the adapter was saved for other masks: the model is nonzero in blocks its masks "
                         f"mark pruned ({'; '.join(leaked[:3])}; is this the pruned model it was trained on?)")
    adapted = add_masked_lora(model, masks, block, target_modules=settings.target_modules, r=settings.r,
                              alpha=settings.alpha, dropout=settings.dropout)
    unmasked = sorted(name for name in adapted if f"{name}.weight" not in masks)
    if unmasked:
        raise ValueError(f"{folder}: the adapter's masks do not cover {unmasked[:3]}")
    copy_adapter_weights(adapted, tensors, folder)
    return adapted


def copy_adapter_weights(adapted: Dict[str, MaskedLoRALinear], tensors: Dict[str, torch.Tensor], folder) -> None:
    """Copy an adapter file's tensors ({peft key: tensor}) into the adapters; ValueError when they do not match."""
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight" for name in adapted for part in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS} does not match the adapted modules, e.g. {odd[:3]}")
    with torch.no_grad():
        for name, module in adapted.items():
            for part in ("lora_A", "lora_B"):
                value = tensors[f"{PEFT_PREFIX}{name}.{part}.weight"]
                target = getattr(module, part)
                if value.shape != target.shape:
                    raise ValueError(f"{folder}: {name}.{part} has shape {tuple(value.shape)}, the model needs "
                                     f"{tuple(target.shape)}")
                target.copy_(value)


def check_merged(model: nn.Module, masks: Dict[str, torch.Tensor], block: Tuple[int, int]) -> int:
    """After the merge: every block `masks` marks pruned is exactly zero (SparsityViolation naming the weights
    otherwise). Returns how many weights were checked."""
    leaked = pruned_block_leaks(dict(model.named_parameters()), masks, block, "the merged model's masks")
    if leaked:
        raise SparsityViolation("the merged model is nonzero in pruned blocks: " + "; ".join(leaked[:5]))
    return len(masks)


# ------------------------------------------------------------------- the fine-tune's steps (finetune.py's _Job)
def prepare_job(job) -> None:
    """--lora, on the CPU before anything is placed: the frozen model's masks and sparsity, the teacher's weights
    shared with it where they can be (one copy on the GPU), then the adapters."""
    job.masks, job.lora_block = pruned_masks(job.model, job.args.masks_file, job.prune_block)
    job.sparsity["before"] = check_sparsity(job.model, verbose=False)
    job.pruned_blocks["before"] = pruned_fraction(job.model, job.masks, job.lora_block)
    settings = job.plan.lora
    adapted, not_shared = prepare(job.model, job.teacher, job.masks, job.lora_block, settings,
                                  share=not job.args.lora_args.lora_separate_teacher)
    masked = sum(f"{name}.weight" in job.masks for name in adapted)
    job.say(f"Masked LoRA: {len(adapted)} Linear layers adapted ({masked} of them pruned, masked), "
            f"{settings.describe()}")
    if job.teacher is not None:
        job.say("Masked LoRA: the student and the teacher share one copy of the dense weights (the student masks its "
                "pruned blocks in each product)" if not_shared is None else
                f"Masked LoRA: the teacher is a second copy of the weights ({not_shared})")


def adopt_adapters(job, checkpoint: str) -> None:
    """The adapters of a checkpoint that holds every step; or, when the merged model is in place already, the adapter
    saved beside it, merged again (the same sums, so the same weights). finetune.py takes the trainer state."""
    from .run_folder import load_weights

    if Path(checkpoint) == job.output_dir:
        folder = job.output_dir / ADAPTER_DIR
        _, tensors, _, _ = read_adapter(folder)
        copy_adapter_weights(adapters_of(job.model), tensors, folder)
        merge_masked_lora(job.model)
        check_merged(job.model, job.masks, job.lora_block)
    else:
        load_weights(job.model, checkpoint, trainable_only=True)


def write_result(job, staging: Path) -> None:
    """The main process's end: the adapter in PEFT's format (staging/adapter), then the merged model, checked: every
    pruned block exactly zero."""
    from .models import save_model

    model = job.trainer.accelerator.unwrap_model(job.trainer.model)
    base = str(Path(job.args.model).resolve()) if Path(job.args.model).exists() else job.args.model
    save_adapter(model, staging / ADAPTER_DIR, job.plan.lora, base_model=base)
    _, merged = merge_masked_lora(model)
    checked = check_merged(model, job.masks, job.lora_block)
    save_model(model, job.tokenizer, staging)
    job.say(f"Merged {merged} adapters: {checked} pruned weights checked, every pruned block exactly zero")
