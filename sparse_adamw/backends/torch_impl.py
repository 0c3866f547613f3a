"""Vectorised PyTorch backend: gathers the live blocks, applies the reference math in fp32, scatters them back.

A (R, C) parameter splits into at most four rectangles whose blocks all have one shape: the whole blocks, the
right edge column, the bottom edge row and the corner. Each rectangle is viewed as (nbr, h, nbc, w) without a
copy, so its live blocks are one gather and one scatter; pruned blocks are never written.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple

import torch

from ..layout import BlockLayout
from ..reference import adamw_math, round_to_bf16_stochastic


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Region(NamedTuple):
    rows: slice
    cols: slice
    block: tuple  # (n block rows, h, n block cols, w) of the view
    block_rows: torch.Tensor  # live blocks, local coordinates in the region
    block_cols: torch.Tensor
    slots: torch.Tensor  # their compact-state slots


def _regions(layout: BlockLayout) -> List[_Region]:
    bh, bw = layout.block
    rows, cols = layout.rows, layout.cols
    mask = layout.mask
    nbc = mask.shape[1]
    slot_of = torch.full((mask.numel(),), -1, dtype=torch.long, device=mask.device)
    slot_of[layout.live_ids().long()] = torch.arange(layout.n_live, device=mask.device)
    full_r, full_c = rows // bh, cols // bw
    row_parts = [(0, full_r * bh, bh, 0, full_r), (full_r * bh, rows, rows - full_r * bh, full_r, 1)]
    col_parts = [(0, full_c * bw, bw, 0, full_c), (full_c * bw, cols, cols - full_c * bw, full_c, 1)]
    regions = []
    for r_lo, r_hi, h, br0, n_r in row_parts:
        for c_lo, c_hi, w, bc0, n_c in col_parts:
            if r_hi <= r_lo or c_hi <= c_lo:
                continue
            i, j = mask[br0 : br0 + n_r, bc0 : bc0 + n_c].nonzero(as_tuple=True)
            if i.numel():
                slots = slot_of[(br0 + i) * nbc + bc0 + j]
                regions.append(_Region(slice(r_lo, r_hi), slice(c_lo, c_hi), (n_r, h, n_c, w), i, j, slots))
    return regions


def _round_param(u, p: torch.Tensor, index) -> torch.Tensor:
    """fp32 -> the param's dtype; `index` (a callable: flat element offsets) only for stochastic rounding."""
    if u.rounding_seed is not None and u.param.dtype == torch.bfloat16:
        return round_to_bf16_stochastic(p, index(), u.rounding_seed)
    return p.to(u.param.dtype)


def _math(u, p, g, m, v):
    return adamw_math(
        p.float(), g.float(), m.float(), v.float(),
        step=u.step, lr=u.lr, beta1=u.beta1, beta2=u.beta2, eps=u.eps, weight_decay=u.weight_decay,
    )


def _element_index(reg: _Region, cols: int, device) -> torch.Tensor:
    """Flat offsets in the param of the gathered live blocks of `reg`, shape (n, h, w)."""
    _, h, _, w = reg.block
    rows = reg.rows.start + reg.block_rows.to(device)[:, None] * h + torch.arange(h, device=device)
    cols_ = reg.cols.start + reg.block_cols.to(device)[:, None] * w + torch.arange(w, device=device)
    return rows[:, :, None] * cols + cols_[:, None, :]


@torch.no_grad()
def step(updates, cache: Dict) -> None:
    for u in updates:
        if u.layout.mask is None:
            p, m, v = _math(u, u.param, u.grad, u.exp_avg, u.exp_avg_sq)
            u.param.copy_(_round_param(u, p, lambda: torch.arange(p.numel(), device=p.device).view(p.shape)))
            u.exp_avg.copy_(m)
            u.exp_avg_sq.copy_(v)
            continue
        key = ("torch_regions", id(u.layout))
        if cache.get(key, (None,))[0] is not u.layout:
            cache[key] = (u.layout, _regions(u.layout))
        for reg in cache[key][1]:
            pv = u.param[reg.rows, reg.cols].view(reg.block)
            gv = u.grad[reg.rows, reg.cols].view(reg.block)
            h, w = reg.block[1], reg.block[3]
            i, j, s = reg.block_rows, reg.block_cols, reg.slots
            p, m, v = _math(u, pv[i, :, j, :], gv[i, :, j, :], u.exp_avg[s, :h, :w], u.exp_avg_sq[s, :h, :w])
            pv[i, :, j, :] = _round_param(u, p, lambda: _element_index(reg, u.layout.cols, p.device))
            u.exp_avg[s, :h, :w] = m.to(u.exp_avg.dtype)
            u.exp_avg_sq[s, :h, :w] = v.to(u.exp_avg_sq.dtype)
