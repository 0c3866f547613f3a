"""The specification: one AdamW step on the live blocks of one parameter, in plain PyTorch.

Every backend matches this module. It is written for clarity, not speed: `sparse_adamw_reference` computes the
update everywhere and then keeps the old values in pruned blocks, so pruned entries come out bitwise unchanged
whatever the gradient holds there (NaN and inf included). docs/design.md, "The update rule", explains it.

Three parts every backend shares, so that they all compute the same bits:
- `step_constants`: a step's scalars (bias corrections folded in), computed once in double precision; each
  backend rounds them to fp32 and applies them in `adamw_math`'s order;
- `rounding_seed` and its parts: which random bits a parameter's stochastic rounding uses at a step;
- `hash32`: the random bits of one element. Its low 16 bits round a bf16 param, its high 16 bits a bf16
  exp_avg_sq.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .masks import BlockSize, expand_block_mask


_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """32 random bits per element from (element index, seed): murmur3's finaliser, identical in every backend."""
    h = _mul32(index.to(torch.int64) & _M32, 0x9E3779B1) ^ (seed & _M32)
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def round_to_bf16_stochastic(x: torch.Tensor, index: torch.Tensor, seed: int, high: bool = False) -> torch.Tensor:
    """Round fp32 `x` to bf16, up (in magnitude) with probability equal to the dropped fraction.

    Adding 16 random bits below bf16's last mantissa bit and truncating is unbiased: E[result] = x. `index` is each
    element's flat offset in its parameter, so a seed fixes every decision. The bits are the low half of
    `hash32(index, seed)`, or with `high` its high half: a param and its exp_avg_sq share one hash per element
    and round independently. NaN and inf pass through.
    """
    h = hash32(index, seed)
    return round_to_bf16_with_bits(x, (h >> 16) if high else (h & 0xFFFF))


def round_to_bf16_with_bits(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """`round_to_bf16_stochastic` given each element's 16 random bits (int64 in [0, 2**16))."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    bits = (bits + random16) & _M32
    upper = (bits >> 16).to(torch.int32)
    upper = torch.where(upper >= 0x8000, upper - 0x10000, upper)  # as a signed 16-bit pattern
    return upper.to(torch.int16).view(torch.bfloat16)


class StepConstants(NamedTuple):
    """The scalars of one step of the update, in the one order every backend reads them (a "hyper row")."""

    decay: float  # 1 - lr * weight_decay
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1**step)
    bc2_sqrt: float  # sqrt(1 - beta2**step)


def step_constants(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   step: int) -> StepConstants:
    """Step number `step` (counted from 1)'s constants, each computed in double and rounded once by its user."""
    return StepConstants(1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1**step),
                         math.sqrt(1 - beta2**step))


def adamw_math(p, g, m, v, c: StepConstants):
    """The AdamW update on already-upcast tensors with step constants `c`; returns new (p, m, v).

    Decoupled weight decay first, then the moments, then the bias-corrected step: torch.optim.AdamW's order
    (docs/design.md, "The update rule"). The compiled kernels repeat these operations one by one.
    """
    p = p * c.decay
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    denom = v.sqrt() / c.bc2_sqrt + c.eps
    return p - c.step_size * (m / denom), m, v


# The rounding seed of a parameter at a step: murmur3's finaliser of a mix of (optimizer seed, step, the parameter's
# position in the optimizer). In two parts, so that a launch can combine a per-step part with a per-parameter one.
def rounding_seed(seed: int, step: int, index: int) -> int:
    return fmix32(seed_mix(seed, step) ^ index_mix(index))


def seed_mix(seed: int, step: int) -> int:
    return (seed * 0x9E3779B1 ^ step * 0x85EBCA6B) & 0xFFFFFFFF


def index_mix(index: int) -> int:
    return (index * 0xC2B2AE35) & 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser (`hash32` applies it to tensors)."""
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


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
    rounding_seed: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (param, exp_avg, exp_avg_sq) after step number `step` (counted from 1), in their input dtypes.

    `exp_avg` and `exp_avg_sq` are param-shaped here. `block_mask` (True = live) of shape
    (ceil(R/bh), ceil(C/bw)) restricts the update to live blocks; None means every element is live.
    With `rounding_seed`, a bf16 param and a bf16 exp_avg_sq are rounded stochastically
    (`round_to_bf16_stochastic`); exp_avg always to nearest. Rounded to nearest, a bf16 exp_avg_sq could never
    decrease with beta2 = 0.999: one step lowers it by at most 0.1%, less than half a bf16 step (docs/design.md,
    "bf16 optimizer states").
    """
    p, m, v = adamw_math(
        param.to(compute_dtype), grad.to(compute_dtype), exp_avg.to(compute_dtype), exp_avg_sq.to(compute_dtype),
        step_constants(lr, beta1, beta2, eps, weight_decay, step),
    )
    index = torch.arange(p.numel()).reshape(p.shape)
    if rounding_seed is not None and param.dtype == torch.bfloat16:
        new_p = round_to_bf16_stochastic(p, index, rounding_seed)
    else:
        new_p = p.to(param.dtype)
    if rounding_seed is not None and exp_avg_sq.dtype == torch.bfloat16:
        new_v = round_to_bf16_stochastic(v, index, rounding_seed, high=True)
    else:
        new_v = v.to(exp_avg_sq.dtype)
    new = (new_p, m.to(exp_avg.dtype), new_v)
    if block_mask is None:
        return new
    live = expand_block_mask(block_mask.to(param.device), param.shape, block_size)
    old = (param, exp_avg, exp_avg_sq)
    return tuple(torch.where(live, n, o) for n, o in zip(new, old))
