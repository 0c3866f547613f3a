"""Fused masked AdamW in Triton: one launch updates every live block of many parameters of one dtype.

Each program updates K live blocks of one parameter, a [K, BH, BW] tile. Per parameter, a row of a small int64
table holds its addresses (param, grad, exp_avg, exp_avg_sq, live-block ids) and shape, and a row of an fp32
table holds its step's scalars. Those change every step (grads are reallocated, lr follows a scheduler) but are
plain data, so nothing recompiles. Pruned blocks are not in the live list: no program reads or writes them.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _store(ptr, x, mask, DTYPE: tl.constexpr):
    """Store fp32 `x` as DTYPE, rounding to nearest even."""
    if DTYPE == tl.bfloat16:
        # By hand: the interpreter's fp32 -> bf16 cast truncates; this is exact on both. NaN and inf survive.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _sparse_adamw_kernel(
    meta_ptr,
    hyper_ptr,
    prog_tensor_ptr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    K: tl.constexpr,
):
    # meta row (int64): param, grad, exp_avg, exp_avg_sq, live-id addresses; rows, cols, numel, block cols,
    # live blocks, first program. hyper row (fp32): decay, b1, 1-b1, b2, 1-b2, eps, lr/bc1, sqrt(bc2).
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    meta = meta_ptr + t * 11
    p_ptr = tl.load(meta + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(meta + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(meta + 2).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(meta + 3).to(tl.pointer_type(S_DTYPE))
    ids_addr = tl.load(meta + 4)
    rows = tl.load(meta + 5)
    cols = tl.load(meta + 6)
    numel = tl.load(meta + 7)
    n_block_cols = tl.load(meta + 8)
    n_live = tl.load(meta + 9)
    prog0 = tl.load(meta + 10)

    hyper = hyper_ptr + t * 8
    decay = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    one_minus_beta1 = tl.load(hyper + 2)
    beta2 = tl.load(hyper + 3)
    one_minus_beta2 = tl.load(hyper + 4)
    eps = tl.load(hyper + 5)
    step_size = tl.load(hyper + 6)
    bc2_sqrt = tl.load(hyper + 7)

    # Ordinals of this program's blocks among the parameter's live blocks = their compact-state slots.
    slot = (pid - prog0) * K + tl.arange(0, K).to(tl.int64)
    slot_ok = slot < n_live
    if ids_addr != 0:
        ids_ptr = ids_addr.to(tl.pointer_type(tl.int32))
        block_id = tl.load(ids_ptr + slot, mask=slot_ok, other=0).to(tl.int64)
    else:  # no mask: every block is live, in order
        block_id = slot
    block_row = block_id // n_block_cols
    block_col = block_id % n_block_cols

    r = tl.arange(0, TILE_H)[None, :, None]
    c = tl.arange(0, TILE_W)[None, None, :]
    row = block_row[:, None, None] * BH + r
    col = block_col[:, None, None] * BW + c
    offs = row * cols + col
    ok = slot_ok[:, None, None] & (r < BH) & (c < BW) & (row < rows) & (col < cols) & (offs < numel)
    state_offs = slot[:, None, None] * (BH * BW) + r * BW + c

    p = tl.load(p_ptr + offs, mask=ok).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    m = tl.load(m_ptr + state_offs, mask=ok).to(tl.float32)
    v = tl.load(v_ptr + state_offs, mask=ok).to(tl.float32)

    # DESIGN.md section 1, in torch.optim.AdamW's order; IEEE sqrt and division to track torch closely.
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    _store(p_ptr + offs, p, ok, P_DTYPE)
    _store(m_ptr + state_offs, m, ok, S_DTYPE)
    _store(v_ptr + state_offs, v, ok, S_DTYPE)


# Launch parameters; 0 blocks per program picks about 4096 elements. Benchmarks set these to sweep them.
BLOCKS_PER_PROGRAM = 0
NUM_WARPS = 4


def _blocks_per_program(block) -> int:
    # About 4096 elements per program: enough bytes in flight per SM without starving the grid.
    return max(1, triton.next_power_of_2(max(1, 4096 // (block[0] * block[1]))))


def _plan(updates, cache: Dict, k: int):
    """Static part of a launch (cached per set of layouts): the int64 table's shape columns and program map."""
    key = ("triton_plan", k) + tuple(id(u.layout) for u in updates)
    hit = cache.get(key)
    if hit is not None and all(a is u.layout for a, u in zip(hit[0], updates)):
        return hit[1], hit[2]
    shape_cols: List[List[int]] = []
    prog_tensor = []
    n_prog = 0
    for t, u in enumerate(updates):
        lay = u.layout
        ids_addr = lay.live_ids.data_ptr() if lay.live_ids is not None and lay.n_live else 0
        shape_cols.append([ids_addr, lay.rows, lay.cols, lay.numel, lay.n_block_cols, lay.n_live, n_prog])
        progs = math.ceil(lay.n_live / k)
        prog_tensor.append(torch.full((progs,), t, dtype=torch.int32))
        n_prog += progs
    device = updates[0].param.device
    prog_tensor = torch.cat(prog_tensor).to(device) if prog_tensor else torch.empty(0, dtype=torch.int32)
    cache[key] = ([u.layout for u in updates], shape_cols, prog_tensor)
    return shape_cols, prog_tensor


def step(updates, cache: Dict) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one launch."""
    updates = [u for u in updates if u.layout.numel and u.layout.n_live]
    if not updates:
        return
    first = updates[0]
    block = first.layout.block
    k = BLOCKS_PER_PROGRAM or _blocks_per_program(block)
    shape_cols, prog_tensor = _plan(updates, cache, k)

    meta, hyper = [], []
    for u, static in zip(updates, shape_cols):
        meta.append([u.param.data_ptr(), u.grad.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr(), *static])
        hyper.append([
            1 - u.lr * u.weight_decay, u.beta1, 1 - u.beta1, u.beta2, 1 - u.beta2, u.eps,
            u.lr / (1 - u.beta1**u.step), math.sqrt(1 - u.beta2**u.step),
        ])
    device = first.param.device
    meta = torch.tensor(meta, dtype=torch.int64).to(device)
    hyper = torch.tensor(hyper, dtype=torch.float32).to(device)
    _sparse_adamw_kernel[(prog_tensor.numel(),)](
        meta, hyper, prog_tensor,
        P_DTYPE=_TL_DTYPES[first.param.dtype],
        G_DTYPE=_TL_DTYPES[first.grad.dtype],
        S_DTYPE=_TL_DTYPES[first.exp_avg.dtype],
        BH=block[0], BW=block[1],
        TILE_H=triton.next_power_of_2(block[0]), TILE_W=triton.next_power_of_2(block[1]),
        K=k,
        num_warps=NUM_WARPS,
    )
