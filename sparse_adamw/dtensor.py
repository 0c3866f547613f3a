"""The few facts SparseAdamW needs about FSDP2's DTensor parameters, without importing torch.distributed eagerly.

FSDP2 (`fully_shard`) shards each parameter by rows (`Shard(0)`): a rank holds rows [row_offset, row_offset + n)
of the whole parameter. Plain tensors pass through every helper unchanged.
"""
from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or `t` itself."""
    return t._local_tensor if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathers a DTensor: every rank must call this in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def sharded_mesh_dims(t):
    """(mesh, the mesh dims a DTensor is sharded over), or None for a plain or replicated tensor."""
    if not is_dtensor(t):
        return None
    dims = tuple(i for i, placement in enumerate(t.placements) if placement.is_shard())
    return (t.device_mesh, dims) if dims else None


def row_offset(p: torch.Tensor, what: str = "a parameter") -> int:
    """First row of this rank's shard of `p` in the whole parameter (0 for plain tensors).

    Raises NotImplementedError, naming `what`, for placements other than row shards and replicas.
    """
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise NotImplementedError(f"{what} is sharded as {p.placements}; SparseAdamW handles row shards "
                                      "(Shard(0), as FSDP2 makes) and replicas")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) if len(offset) else 0


def distributed() -> bool:
    """Whether a default process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
