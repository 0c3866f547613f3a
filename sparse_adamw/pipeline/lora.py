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
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import BlockSize, block_grid, expand_block_mask, normalize_block_size


def _masked(product: torch.Tensor, block_mask: torch.Tensor, block: Tuple[int, int], scale: float) -> torch.Tensor:
    """product ⊙ M · scale, in place, M expanded from the block mask for this product only."""
    return product.mul_(expand_block_mask(block_mask, product.shape, block)).mul_(scale)


class MaskedDelta(torch.autograd.Function):
    """x Δᵀ with Δ = M ⊙ (B·A) · scale, Δ recomputed in backward instead of kept."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, block_mask, block: Tuple[int, int], scale: float):
        ctx.save_for_backward(x, lora_a, lora_b, block_mask)
        ctx.block, ctx.scale = block, scale
        return F.linear(x, _masked(lora_b @ lora_a, block_mask, block, scale))

    @staticmethod
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


class MaskedLoRALinear(nn.Module):
    """A frozen (pruned) Linear with a masked LoRA adapter (see the module docstring)."""

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

    def delta(self) -> torch.Tensor:
        """M ⊙ (B·A) · scale, the weight-sized change the merge adds."""
        return _masked(self.lora_B @ self.lora_A, self.block_mask, self.block, self.scale)

    def forward(self, x):
        return self.base(x) + MaskedDelta.apply(self.dropout(x), self.lora_A, self.lora_B, self.block_mask,
                                                self.block, self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with W + Δ as its weight (in place: the adapter is spent)."""
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


def merge_masked_lora(model: nn.Module) -> Tuple[nn.Module, int]:
    """Replace every MaskedLoRALinear by its merged Linear, in place; returns (model, how many were merged)."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLoRALinear):
            _replace(model, name, module.merged())
            merged += 1
    return model, merged
