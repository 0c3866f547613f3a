"""Where a parameter's live blocks are, and how its compact optimizer state is laid out.

Compact state format (what `exp_avg` / `exp_avg_sq` hold in the optimizer state):

* A parameter **with** a block mask of shape (nbr, nbc) keeps its state as a tensor of shape (n_live, bh, bw):
  slot s holds the s-th live block in row-major block order (block id br * nbc + bc ascending). A partial edge
  block uses the top-left part of its slot; the rest of the slot is never read or written. Pruned blocks have
  no slot, so state memory is the live fraction of dense.
* A parameter **without** a mask keeps param-shaped state, exactly as torch.optim.AdamW does. The kernels see it
  as a (ceil(numel / bw), bw) matrix of whole blocks; row-major order makes slot offsets equal element offsets.

`compact_to_dense` / `dense_to_compact` convert between the two for tools that expect param-shaped state.

A row shard of a parameter (FSDP2 shards dim 0) is laid out against the *global* block grid: its layout holds the
mask rows of the blocks it intersects, and `row_shift` says how far into its first block row the shard starts. A
block that straddles two shards has a slot on both ranks, each using its own rows of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .masks import block_grid, live_block_ids


@dataclass
class BlockLayout:
    """The kernels' view of one parameter: a (rows, cols) matrix of (bh, bw) blocks, of which n_live are updated."""

    rows: int
    cols: int
    numel: int
    block: Tuple[int, int]
    mask: Optional[torch.Tensor]  # (nbr, nbc) bool, or None for an all-live parameter
    n_live: int  # live blocks = compact-state slots
    row_shift: int = 0  # rows of the first block row that lie before this (shard of a) parameter
    index_base: int = 0  # flat offset of element 0 in the whole parameter (stochastic rounding's counter)

    @property
    def n_block_cols(self) -> int:
        return math.ceil(self.cols / self.block[1])

    def live_ids(self) -> torch.Tensor:
        """int32 row-major ids of the live blocks, on the mask's device (all blocks when there is no mask)."""
        if self.mask is None:
            return torch.arange(self.n_live, dtype=torch.int32)
        return live_block_ids(self.mask)

    @property
    def state_shape(self) -> Tuple[int, ...]:
        return (self.n_live, *self.block)

    @classmethod
    def for_param(cls, param: torch.Tensor, block: Tuple[int, int], mask: Optional[torch.Tensor],
                  row_offset: int = 0) -> "BlockLayout":
        """Layout of `param`, or of rows [row_offset, row_offset + len(param)) of a parameter `mask` belongs to."""
        index_base = row_offset * math.prod(param.shape[1:])
        if mask is None:
            rows = math.ceil(param.numel() / block[1])
            return cls(rows, block[1], param.numel(), block, None, math.ceil(rows / block[0]), 0, index_base)
        rows, cols = param.shape
        first, end = row_offset // block[0], math.ceil((row_offset + rows) / block[0]) if rows else row_offset // block[0]
        mask = mask[first:end]
        return cls(rows, cols, param.numel(), block, mask, int(mask.sum()), row_offset - first * block[0],
                   index_base)


def program_map(layouts, blocks_per_program: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The work split shared by the compiled and Triton kernels, as int32 CPU tensors: the tensor index of each
    program (K live blocks of one tensor), and K block ids per program, zero-padded past a tensor's last block."""
    k = blocks_per_program
    prog_tensor, block_ids = [], []
    for t, lay in enumerate(layouts):
        progs = math.ceil(lay.n_live / k)
        prog_tensor.append(torch.full((progs,), t, dtype=torch.int32))
        block_ids += [lay.live_ids().cpu(), torch.zeros(progs * k - lay.n_live, dtype=torch.int32)]
    return torch.cat(prog_tensor), torch.cat(block_ids)


def new_state(param: torch.Tensor, layout: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed state for one moment (exp_avg or exp_avg_sq) in the compact format."""
    if layout.mask is None:
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.zeros(layout.state_shape, dtype=dtype, device=param.device)


def _live_coords(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = live_block_ids(mask).long()
    return ids // mask.shape[1], ids % mask.shape[1]


def compact_to_dense(state: torch.Tensor, mask: Optional[torch.Tensor], shape, block, row_shift: int = 0
                     ) -> torch.Tensor:
    """Param-shaped copy of a compact state tensor; pruned blocks read as zero.

    For a row shard, pass its layout's mask and `row_shift` and the shard's shape.
    """
    if mask is None:
        return state.reshape(shape).clone()
    bh, bw = block
    rows, cols = shape
    nbr, nbc = mask.shape
    grid = torch.zeros(nbr, nbc, bh, bw, dtype=state.dtype, device=state.device)
    br, bc = _live_coords(mask.to(state.device))
    grid[br, bc] = state
    dense = grid.permute(0, 2, 1, 3).reshape(nbr * bh, nbc * bw)
    return dense[row_shift : row_shift + rows, :cols].contiguous()


def dense_to_compact(dense: torch.Tensor, mask: Optional[torch.Tensor], block) -> torch.Tensor:
    """Compact copy of a param-shaped state tensor (the inverse of `compact_to_dense` on live blocks)."""
    if mask is None:
        return dense.clone()
    bh, bw = block
    rows, cols = dense.shape
    nbr, nbc = block_grid(dense.shape, block)
    padded = torch.nn.functional.pad(dense, (0, nbc * bw - cols, 0, nbr * bh - rows))
    br, bc = _live_coords(mask.to(dense.device))
    return padded.reshape(nbr, bh, nbc, bw).permute(0, 2, 1, 3)[br, bc].contiguous()
