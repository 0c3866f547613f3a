"""Vectorised PyTorch backend: gathers the live blocks, applies the reference math in fp32, scatters them back.

A (R, C) parameter splits into at most six rectangles whose blocks all have one shape: the whole blocks, the
right edge column, the bottom edge row, the corner, and for a row shard that starts mid-block, its partial first
block row. Each rectangle is viewed as (nbr, h, nbc, w) without a copy, so its live blocks are one gather and one
scatter; pruned blocks are never written.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple

import torch

from ..layout import BlockLayout
from ..reference import adamw_math, hash32, round_to_bf16_with_bits


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Region(NamedTuple):
    rows: slice
    cols: slice
    block: tuple  # (n block rows, h, n block cols, w) of the view
    block_rows: torch.Tensor  # live blocks, local coordinates in the region
    block_cols: torch.Tensor
    slots: torch.Tensor  # their compact-state slots
    state_row: int  # the region's first row inside its blocks (nonzero only for a shard's partial first row)


def _row_parts(rows: int, bh: int, shift: int):
    """(first row, end row, height, first block row, block rows, row inside the block) of each row band."""
    end = shift + rows  # in rows of the block grid, which starts `shift` rows before the first row
    parts = []
    if shift:
        h = min(bh, end) - shift
        parts.append((0, h, h, 0, 1, shift))
        if end <= bh:
            return parts
    first, last = (1 if shift else 0), end // bh
    if last > first:
        parts.append((first * bh - shift, last * bh - shift, bh, first, last - first, 0))
    if end > last * bh:
        parts.append((last * bh - shift, rows, end - last * bh, last, 1, 0))
    return parts


def _regions(layout: BlockLayout) -> List[_Region]:
    bh, bw = layout.block
    cols = layout.cols
    mask = layout.mask
    nbc = mask.shape[1]
    slot_of = torch.full((mask.numel(),), -1, dtype=torch.long, device=mask.device)
    slot_of[layout.live_ids().long()] = torch.arange(layout.n_live, device=mask.device)
    full_c = cols // bw
    col_parts = [(0, full_c * bw, bw, 0, full_c), (full_c * bw, cols, cols - full_c * bw, full_c, 1)]
    regions = []
    for r_lo, r_hi, h, br0, n_r, state_row in _row_parts(layout.rows, bh, layout.row_shift):
        for c_lo, c_hi, w, bc0, n_c in col_parts:
            if r_hi <= r_lo or c_hi <= c_lo:
                continue
            i, j = mask[br0 : br0 + n_r, bc0 : bc0 + n_c].nonzero(as_tuple=True)
            if i.numel():
                slots = slot_of[(br0 + i) * nbc + bc0 + j]
                regions.append(_Region(slice(r_lo, r_hi), slice(c_lo, c_hi), (n_r, h, n_c, w), i, j, slots,
                                       state_row))
    return regions


def _round(u, p: torch.Tensor, v: torch.Tensor, index):
    """fp32 p and v -> the param's and exp_avg_sq's dtypes, by the reference's rule: with a rounding seed, a bf16
    one rounds stochastically, p with the low and v with the high half of one hash per element. `index` (a
    callable: flat element offsets in the param) is called only then."""
    seed = u.rounding_seed
    p_random = seed is not None and u.param.dtype == torch.bfloat16
    v_random = seed is not None and u.exp_avg_sq.dtype == torch.bfloat16
    h = hash32(index(), seed) if p_random or v_random else None
    return (round_to_bf16_with_bits(p, h & 0xFFFF) if p_random else p.to(u.param.dtype),
            round_to_bf16_with_bits(v, h >> 16) if v_random else v.to(u.exp_avg_sq.dtype))


def _math(u, p, g, m, v, grad_scale):
    g = g.float() if grad_scale is None else g.float() * grad_scale
    return adamw_math(p.float(), g, m.float(), v.float(), u.constants)


def _element_index(reg: _Region, layout: BlockLayout, device) -> torch.Tensor:
    """Flat offsets in the whole param of the gathered live blocks of `reg`, shape (n, h, w)."""
    _, h, _, w = reg.block
    rows = reg.rows.start + reg.block_rows.to(device)[:, None] * h + torch.arange(h, device=device)
    cols = reg.cols.start + reg.block_cols.to(device)[:, None] * w + torch.arange(w, device=device)
    return layout.index_base + rows[:, :, None] * layout.cols + cols[:, None, :]


@torch.no_grad()
def step(updates, cache: Dict, launch=None, grad_scale=None) -> None:
    """Update `updates`; `grad_scale` (None or a one-element tensor) multiplies every gradient as it is read."""
    for u in updates:
        if u.layout.mask is None:
            p, m, v = _math(u, u.param, u.grad, u.exp_avg, u.exp_avg_sq, grad_scale)
            index = lambda: u.layout.index_base + torch.arange(p.numel(), device=p.device).view(p.shape)  # noqa: E731
            p, v = _round(u, p, v, index)
            u.param.copy_(p)
            u.exp_avg.copy_(m)
            u.exp_avg_sq.copy_(v)
            continue
        key = ("torch_regions", id(u.layout))
        if cache.get(key, (None,))[0] is not u.layout:
            cache[key] = (u.layout, _regions(u.layout))
        for reg in cache[key][1]:
            pv = u.param[reg.rows, reg.cols].view(reg.block)
            gv = u.grad[reg.rows, reg.cols].view(reg.block)
            r, w = slice(reg.state_row, reg.state_row + reg.block[1]), reg.block[3]
            i, j, s = reg.block_rows, reg.block_cols, reg.slots
            p, m, v = _math(u, pv[i, :, j, :], gv[i, :, j, :], u.exp_avg[s, r, :w], u.exp_avg_sq[s, r, :w],
                            grad_scale)
            pv[i, :, j, :], u.exp_avg_sq[s, r, :w] = _round(u, p, v, lambda: _element_index(reg, u.layout, p.device))
            u.exp_avg[s, r, :w] = m.to(u.exp_avg.dtype)


@torch.no_grad()
def square_sum(grads, layouts, cache=None, launch=None) -> torch.Tensor:
    """The fp32 sum of squares of the live blocks of `grads` (one device), each laid out by its layout; a 0-dim
    tensor. Each masked gradient is read once as (block rows, bh, block cols, bw), after a zero-padded copy where it
    is no whole number of blocks or is a row shard that starts mid-block; pruned blocks are dropped with where(), so
    NaN or inf there does not count."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for grad, layout in zip(grads, layouts):
        if layout.mask is None:
            total += _fp32_norm(grad).square()
        elif grad.numel():
            squares = _block_square_norms(grad, layout.row_shift, layout.block)
            total += torch.where(layout.mask.to(squares.device), squares, 0.0).sum()
    return total


def _block_square_norms(grad: torch.Tensor, top: int, block) -> torch.Tensor:
    """Squared L2 norms, fp32, of the (bh, bw) blocks of `grad`, whose first row lies `top` rows into its first
    block row."""
    bh, bw = block
    rows, cols = grad.shape
    nbr, nbc = math.ceil((top + rows) / bh), math.ceil(cols / bw)
    if top or top + rows != nbr * bh or cols != nbc * bw:
        grad = torch.nn.functional.pad(grad, (0, nbc * bw - cols, top, nbr * bh - top - rows))
    return _fp32_norm(grad.reshape(nbr, bh, nbc, bw), dim=(1, 3)).square()


def _fp32_norm(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """vector_norm accumulated in fp32 (no copy of a half-precision `x`); float64 is summed in its own precision, as
    vector_norm refuses to narrow it."""
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, **kwargs).float()
    return torch.linalg.vector_norm(x, dtype=torch.float32, **kwargs)
