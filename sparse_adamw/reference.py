"""The specification: one AdamW step on the live blocks of one parameter, in plain PyTorch.

Every backend matches this function. It is written for clarity, not speed: it computes the update everywhere
and then keeps the old values in pruned blocks, so pruned entries come out bitwise unchanged whatever the
gradient holds there (NaN and inf included).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .masks import BlockSize, expand_block_mask


def adamw_math(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """The AdamW update on already-upcast tensors (DESIGN.md section 1); returns new (p, m, v)."""
    # Decoupled weight decay first, then the moments, then the bias-corrected step: torch.optim.AdamW's order.
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = v.sqrt() / (bias_correction2**0.5) + eps
    return p - (lr / bias_correction1) * (m / denom), m, v


def sparse_adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_mask: Optional[torch.Tensor] = None,
    block_size: BlockSize = 16,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (param, exp_avg, exp_avg_sq) after step number `step` (counted from 1), in their input dtypes.

    `exp_avg` and `exp_avg_sq` are param-shaped here. `block_mask` (True = live) of shape
    (ceil(R/bh), ceil(C/bw)) restricts the update to live blocks; None means every element is live.
    """
    p, m, v = adamw_math(
        param.to(compute_dtype), grad.to(compute_dtype), exp_avg.to(compute_dtype), exp_avg_sq.to(compute_dtype),
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )
    new = (p.to(param.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype))
    if block_mask is None:
        return new
    live = expand_block_mask(block_mask.to(param.device), param.shape, block_size)
    old = (param, exp_avg, exp_avg_sq)
    return tuple(torch.where(live, n, o) for n, o in zip(new, old))
