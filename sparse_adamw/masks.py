"""Block masks: a bool tensor of shape (ceil(R/bh), ceil(C/bw)), True = live block.

A mask is a fact about the model: it is derived once from the pruned weights (a block is pruned iff every entry
is zero) or given explicitly, and it never changes during training.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .dtensor import is_dtensor, local_tensor, row_offset

BlockSize = Union[int, str, Sequence[int]]


def normalize_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """An int, a pair, or a string "16" / "16x16" (the command lines' form) -> (bh, bw), both >= 1."""
    if isinstance(block_size, str):
        parts = block_size.lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"block shape must look like 16 or 16x16, got {block_size!r}") from None
        if len(values) not in (1, 2):
            raise ValueError(f"block shape must look like 16 or 16x16, got {block_size!r}")
        block_size = values if len(values) == 2 else values[0]
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        bh = bw = block_size
    else:
        try:
            bh, bw = (int(x) for x in block_size)
        except (TypeError, ValueError):
            raise ValueError(f"block_size must be an int or a pair of ints, got {block_size!r}") from None
    if bh < 1 or bw < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return bh, bw


def block_grid(shape: Sequence[int], block_size: BlockSize) -> Tuple[int, int]:
    """Shape of the block mask of a 2-D tensor: (ceil(R/bh), ceil(C/bw))."""
    bh, bw = normalize_block_size(block_size)
    rows, cols = shape
    return math.ceil(rows / bh), math.ceil(cols / bw)


def _padded_blocks(weight: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """(nbr, bh, nbc, bw) view of `weight`, zero-padded to whole blocks (a copy only when padding is needed)."""
    rows, cols = weight.shape
    nbr, nbc = math.ceil(rows / bh), math.ceil(cols / bw)
    if rows % bh or cols % bw:
        weight = torch.nn.functional.pad(weight, (0, nbc * bw - cols, 0, nbr * bh - rows))
    return weight.reshape(nbr, bh, nbc, bw)


def check_sparsity_fraction(sparsity: float, what: str = "sparsity") -> float:
    """`sparsity` itself when it is a fraction in [0, 1], else a ValueError that names `what`."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {sparsity}")
    return sparsity


def block_mask_from_zeros(weight: torch.Tensor, block_size: BlockSize = 16) -> torch.Tensor:
    """True where the block holds any nonzero (NaN counts as nonzero). Same device as `weight`."""
    if weight.dim() != 2:
        raise ValueError(f"block masks are for 2-D weights, got shape {tuple(weight.shape)}")
    bh, bw = normalize_block_size(block_size)
    return _padded_blocks(weight.detach().ne(0), bh, bw).any(dim=3).any(dim=1)


def nonzero_blocks(weight: torch.Tensor, block_size: BlockSize = 16) -> torch.Tensor:
    """`block_mask_from_zeros` of the whole weight. For an FSDP2 (DTensor) row shard: the whole weight's grid as far
    as this rank's rows show (the other ranks' rows read as zero), with no collective."""
    if not is_dtensor(weight):
        return block_mask_from_zeros(weight, block_size)
    bh, bw = normalize_block_size(block_size)
    local, offset = local_tensor(weight).detach(), row_offset(weight)
    first = offset // bh
    grid = torch.zeros(block_grid(weight.shape, (bh, bw)), dtype=torch.bool, device=local.device)
    if local.shape[0]:
        part = block_mask_from_zeros(torch.nn.functional.pad(local, (0, 0, offset - first * bh, 0)), (bh, bw))
        grid[first:first + part.shape[0]] = part
    return grid


def leaked_blocks(weight: torch.Tensor, mask: torch.Tensor, block_size: BlockSize = 16) -> torch.Tensor:
    """Bool grid of the blocks that `mask` marks pruned but that hold a nonzero in `weight` (all False is good); for
    a DTensor, in this rank's rows."""
    nonzero = nonzero_blocks(weight, block_size)
    return nonzero & ~mask.to(nonzero.device)


def pruned_block_leaks(weights: Mapping[str, torch.Tensor], masks: Dict[str, torch.Tensor], block_size: BlockSize,
                       source: str = "masks", whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> List[str]:
    """`name: n blocks` for each weight nonzero in blocks its mask marks pruned (empty is good). ValueError naming
    `source` for a mask of a weight `weights` lacks, or of another grid: masks made for another model. `whole`
    gathers a sharded weight, one at a time."""
    block = normalize_block_size(block_size)
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise ValueError(f"{source} names {len(unknown)} parameter(s) the model does not have, e.g. "
                         f"{', '.join(unknown[:3])}; was it made for another model?")
    leaks = []
    for name, mask in masks.items():
        weight = weights[name]
        expected = block_grid(weight.shape, block) if weight.dim() == 2 else None
        if expected is None or tuple(mask.shape) != expected:
            raise ValueError(f"{source}: the mask of {name} has shape {tuple(mask.shape)}, which does not fit the "
                             f"weight {tuple(weight.shape)} in {block[0]}x{block[1]} blocks (that needs {expected})")
        n = int(leaked_blocks(whole(weight.detach()), mask, block).sum())
        if n:
            leaks.append(f"{name}: {n} blocks")
    return leaks


def expand_block_mask(mask: torch.Tensor, shape: Sequence[int], block_size: BlockSize = 16) -> torch.Tensor:
    """Element-wise bool mask of `shape` from a block mask (for references and tests, not the hot path)."""
    bh, bw = normalize_block_size(block_size)
    rows, cols = shape
    return mask.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)[:rows, :cols]


@torch.no_grad()
def apply_block_mask_(weight: torch.Tensor, mask: torch.Tensor, block_size: BlockSize = 16) -> torch.Tensor:
    """Set the pruned blocks of `weight` to +0.0 in place (a multiply would leave -0.0, and NaN for inf)."""
    weight.masked_fill_(~expand_block_mask(mask.to(weight.device), weight.shape, block_size), 0.0)
    return weight


def random_block_mask(
    shape: Sequence[int],
    sparsity: float,
    block_size: BlockSize = 16,
    *,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """A block mask with exactly round(sparsity * n_blocks) pruned blocks, chosen uniformly at random."""
    check_sparsity_fraction(sparsity)
    nbr, nbc = block_grid(shape, block_size)
    n_blocks = nbr * nbc
    n_pruned = round(sparsity * n_blocks)
    order = torch.randperm(n_blocks, generator=generator)
    mask = torch.ones(n_blocks, dtype=torch.bool)
    mask[order[:n_pruned]] = False
    return mask.reshape(nbr, nbc).to(device)


def live_block_ids(mask: torch.Tensor) -> torch.Tensor:
    """Row-major linear ids (br * nbc + bc) of the live blocks, int32, sorted: the order of compact state slots."""
    return mask.reshape(-1).nonzero().reshape(-1).to(torch.int32)


# ------------------------------------------------------------------------------------------------ mask files
MASKS_FILE = "block_masks.pt"  # the prune step's name for it, next to the pruned model
_MASKS_FORMAT = 1


def save_masks(path: Union[str, Path], masks: Dict[str, torch.Tensor], block_size: BlockSize = 16) -> Path:
    """Save {parameter name: bool block mask} with the block shape, loadable with load_masks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _MASKS_FORMAT,
        "block_size": list(normalize_block_size(block_size)),
        "masks": {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()},
    }
    torch.save(payload, path)
    return path


def load_masks(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Tuple[int, int]]:
    """({parameter name: bool block mask}, (bh, bw)) from a file written by save_masks."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _MASKS_FORMAT:
        raise ValueError(f"{path} is not a block masks file written by sparse_adamw.masks.save_masks")
    return dict(payload["masks"]), normalize_block_size(payload["block_size"])
