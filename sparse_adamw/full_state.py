"""FSDP2 whole-parameter state I/O: the state dict a single-process SparseAdamW would have, gathered from row
shards, and its loading into any sharding. `SparseAdamW.full_state_dict` and `load_full_state_dict` call these.

A masked parameter's moments are compact (sparse_adamw.layout): a row shard's slots hold the live blocks its rows
intersect, laid against the whole parameter's block grid. Gathering goes through param-shaped copies, one parameter
at a time, so at most one parameter's whole moments are on the device.
"""
from __future__ import annotations

from typing import Dict

import torch

from .dtensor import distributed, is_dtensor, local_tensor, row_offset
from .layout import BlockLayout, compact_to_dense, dense_to_compact


@torch.no_grad()
def full_state_dict(optimizer, *, to_cpu: bool = True, rank0_only: bool = False) -> Dict[str, object]:
    """The state dict a single-process SparseAdamW over the whole parameters would have.

    Under FSDP2 every rank must call this, in the same order relative to other collectives: each sharded
    parameter's moments are gathered (one parameter at a time). For plain parameters (one process, DDP) it is
    `state_dict()` with its tensors copied.

    Format: exactly `state_dict()`'s, `{"state": {index: {...}}, "param_groups": [...]}` with parameters
    numbered in param-group order, and for each parameter that has state:

    * "block_mask": the whole parameter's bool block mask, shape (ceil(R/bh), ceil(C/bw)), True = live;
    * "step": the number of steps taken (an int);
    * "exp_avg", "exp_avg_sq": for a masked parameter the compact state of the whole parameter, shape
      (n_live, bh, bw), slot s holding the s-th live block of the whole mask in row-major order
      (`sparse_adamw.layout`); for a parameter without a mask, the whole parameter's shape.

    A block that straddles two row shards has a slot on both ranks, each holding its own rows; here the two
    halves are joined into one slot. So this dict loads into a single-process SparseAdamW with
    `load_state_dict`, and into any sharding of the same parameters with `load_full_state_dict`.

    torch.distributed.checkpoint's `get_optimizer_state_dict` / `set_optimizer_state_dict` (what accelerate's
    FSDP2 checkpointing calls) assume that every state tensor is shaped and sharded like its parameter. Compact
    states are not, so use this function (or the per-rank `state_dict()`) instead.

    Args:
        to_cpu: move the tensors to the CPU as they are gathered (default), so that only one parameter's
            moments are on the device at a time.
        rank0_only: return the dict on rank 0 only ({} elsewhere); every rank still takes part in the gathers.
    """
    local = optimizer.state_dict()
    keep = not rank0_only or not distributed() or torch.distributed.get_rank() == 0
    out_state = {}
    for group, saved_group in zip(optimizer.param_groups, local["param_groups"]):
        for p, index in zip(group["params"], saved_group["params"]):
            if index not in local["state"]:
                continue
            state = {}
            for key, value in local["state"][index].items():
                if key in ("exp_avg", "exp_avg_sq") and is_dtensor(p):
                    value = _gather_moment(optimizer, p, group, value)
                if isinstance(value, torch.Tensor):
                    value = value.to("cpu", copy=True) if to_cpu else value.clone()
                state[key] = value
            if keep:
                out_state[index] = state
    if not keep:
        return {}
    return {"state": out_state, "param_groups": local["param_groups"]}


def _gather_moment(optimizer, p: torch.Tensor, group, value: torch.Tensor) -> torch.Tensor:
    """One moment of an FSDP2 parameter, whole: compact (whole mask) for a masked parameter, else param-shaped."""
    from torch.distributed.tensor import DTensor

    layout = _local_layout(optimizer, p, group)
    local = local_tensor(p)
    dense = value if layout.mask is None else compact_to_dense(value, layout.mask, local.shape, layout.block,
                                                               layout.row_shift)
    whole = DTensor.from_local(dense.reshape(local.shape).contiguous(), p.device_mesh, p.placements,
                               run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
    mask = optimizer.state[p].get("block_mask")
    return whole if mask is None else dense_to_compact(whole, mask, layout.block)


@torch.no_grad()
def load_full_state_dict(optimizer, state_dict) -> None:
    """Load a whole-parameter state dict (`full_state_dict()`'s format, which is also what a single-process
    SparseAdamW's `state_dict()` holds) into this optimizer, whose parameters may be FSDP2 row shards.

    Every rank passes the same dict; each keeps the rows of its own shard. No collectives: a dict opened
    with `torch.load(..., mmap=True)` is read only where this rank's rows lie. Resuming on a different
    number of ranks, or moving between one process and FSDP2, works both ways.
    """
    local_state = {}
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for p, index in zip(group["params"], saved_group["params"]):
            if index not in state_dict["state"]:
                continue
            state = dict(state_dict["state"][index])
            if is_dtensor(p):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = _shard_moment(optimizer, p, group, state[key], state.get("block_mask"), key)
            local_state[index] = state
    optimizer.load_state_dict({"state": local_state, "param_groups": state_dict["param_groups"]})


def _shard_moment(optimizer, p: torch.Tensor, group, whole: torch.Tensor, mask, key: str) -> torch.Tensor:
    """This rank's part of one whole-parameter moment, in the compact format of its row shard."""
    local = local_tensor(p)
    offset, rows = row_offset(p, optimizer._describe(p)), local.shape[0] if local.dim() else 0
    if mask is None:
        if tuple(whole.shape) != tuple(p.shape):
            raise ValueError(f"loaded {key} of shape {tuple(whole.shape)} does not fit {optimizer._describe(p)}")
        return whole[offset:offset + rows].clone()
    bh = group["block_size"][0]
    optimizer._check_mask(p, mask.to(p.device), group["block_size"])
    per_row = mask.sum(dim=1).tolist()
    if tuple(whole.shape) != (sum(per_row), *group["block_size"]):
        raise ValueError(f"loaded {key} of shape {tuple(whole.shape)} does not fit {optimizer._describe(p)}: "
                         f"expected {(sum(per_row), *group['block_size'])}")
    first = offset // bh
    end = -(-(offset + rows) // bh) if rows else first
    start, n = sum(per_row[:first]), sum(per_row[first:end])
    shard = whole[start:start + n].clone()
    if n:
        # Rows of a straddling block that belong to the neighbouring shard are never read or written here:
        # zero them, as in a state that was never loaded.
        shard[:per_row[first], :offset - first * bh] = 0
        shard[n - per_row[end - 1]:, offset + rows - (end - 1) * bh:] = 0
    return shard


def _local_layout(optimizer, p: torch.Tensor, group) -> BlockLayout:
    mask = optimizer.state[p].get("block_mask")
    return BlockLayout.for_param(local_tensor(p), group["block_size"], mask, row_offset(p, optimizer._describe(p)))
