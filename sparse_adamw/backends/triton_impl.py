"""The Triton backend: builds the tables of sparse_adamw.triton_kernels.sparse_adamw from the updates, one launch
per batch (one device, param dtype, grad dtype and state dtype).

Per launch, the static part (shape table, program map) comes from the shared `launch_plan`, uploaded once per set
of layouts. Per step: each tensor's addresses (grads are reallocated) and, per distinct hyper-parameters and step,
one row of step constants and one rounding-seed mix (a scheduler changes them), all in one copy.

`step` builds the per-step tables from scratch; `PreparedStep` keeps all of them but the gradient addresses, for
SparseAdamW's fast path (sparse_adamw.fast_path). `square_sum` is clipping's norm over the same launch plan.
"""
from __future__ import annotations

import os
from array import array
from typing import Dict, List, NamedTuple, Sequence

import torch

from ..reference import index_mix, seed_mix
from ..triton_kernels import sparse_adamw as kernel
from .common import DEFAULT_LAUNCH, LaunchConfig, StepRow, launch_plan

DTYPES = tuple(kernel.TL_DTYPES)


def blocks_per_program(block, launch: LaunchConfig) -> int:
    # About 4096 elements per program, 16 per thread at 8 warps: the best of interleaved sweeps on the H100
    # (benchmarks/RESULTS.md); more per thread spills registers. A power of two (tl.arange).
    if launch.blocks_per_program:
        return launch.blocks_per_program
    return 1 << (max(1, 4096 // (block[0] * block[1])) - 1).bit_length()


def _plan(updates, cache: Dict, launch: LaunchConfig):
    layouts = [u.layout for u in updates]
    return launch_plan(layouts, updates[0].param.device, blocks_per_program(layouts[0].block, launch), cache,
                       launch.index_64)


def _hyper_row(row: StepRow) -> tuple:
    """The kernel's row: the step constants with the last one inverted (it multiplies; see the kernel's launch)."""
    c = row.constants
    return (*c[:-1], 1 / c.bc2_sqrt)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned and non-blocking: a pageable copy would wait for the whole stream (the backward pass) to finish.
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _upload(dyn: array, rows: Sequence[StepRow], device: torch.device):
    """The step's tables in one copy (each copy costs host time): int64 step rows, int64 seed mixes, fp32 step
    constants. Python arrays, not tensor ops: a small torch op costs 10 to 20 us of host time on a slow CPU."""
    mixes = [0 if r.seed is None else seed_mix(r.seed, r.step) for r in rows]
    data = bytearray(dyn.tobytes() + array("q", mixes).tobytes()
                     + array("f", [x for r in rows for x in _hyper_row(r)]).tobytes())
    tables = _to_device(torch.frombuffer(data, dtype=torch.int64), device)
    n_dyn, n_rows = len(dyn), len(rows)
    return tables[:n_dyn], tables[n_dyn:n_dyn + n_rows], tables[n_dyn + n_rows:].view(torch.float32)


class _Dtypes(NamedTuple):
    """What a launch compiles for, besides the plan: taken from an update, without keeping its tensors."""

    param: torch.dtype
    grad: torch.dtype
    state: torch.dtype
    stochastic: bool

    @classmethod
    def of(cls, u) -> "_Dtypes":
        return cls(u.param.dtype, u.grad.dtype, u.exp_avg.dtype, u.stochastic)


def _run(plan, dtypes: _Dtypes, tables, aligned: bool, launch: LaunchConfig, grad_scale) -> None:
    kernel.launch(
        plan.device_shapes, *tables, plan.prog_tensor, plan.block_ids, grad_scale,
        param_dtype=dtypes.param, grad_dtype=dtypes.grad, state_dtype=dtypes.state,
        block=plan.layouts[0].block, blocks_per_program=plan.blocks_per_program, index_64=plan.index_64,
        check_edges=_check_edges(plan),
        aligned=aligned and plan.rows_aligned, stochastic=dtypes.stochastic,
        exact_bf16=os.environ.get("TRITON_INTERPRET") == "1", num_warps=launch.num_warps)


def _check_edges(plan) -> bool:
    return not plan.whole_blocks or any(x & (x - 1) for x in plan.layouts[0].block)


def _live(updates) -> List[int]:
    return [i for i, u in enumerate(updates) if u.layout.numel and u.layout.n_live]


def step(updates, cache: Dict, launch: LaunchConfig = DEFAULT_LAUNCH, grad_scale=None) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one launch; `grad_scale` (None or
    an fp32 one-element tensor on their device) multiplies every gradient as the kernel reads it."""
    updates = [updates[i] for i in _live(updates)]
    if not updates:
        return
    plan = _plan(updates, cache, launch)
    dyn = array("q")
    rows: Dict[StepRow, int] = {}
    addresses = 0
    for u in updates:
        row = rows.setdefault(u.row, len(rows))
        p, g, m, v = u.param.data_ptr(), u.grad.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()
        addresses |= p | g | m | v
        dyn.extend((p, g, m, v, index_mix(u.index), row))
    tables = _upload(dyn, list(rows), updates[0].param.device)
    _run(plan, _Dtypes.of(updates[0]), tables, addresses % 16 == 0, launch, grad_scale)


def square_sum(grads, layouts, cache: Dict, launch: LaunchConfig = DEFAULT_LAUNCH) -> torch.Tensor:
    """The fp32 sum of squares of the live blocks of `grads` (one device and dtype, contiguous, each laid out by its
    layout: a row shard by its own), in one launch that reads nothing else; a 0-dim tensor on their device."""
    device = grads[0].device
    keep = [i for i, lay in enumerate(layouts) if lay.numel and lay.n_live]
    if not keep:
        return torch.zeros((), dtype=torch.float32, device=device)
    layouts = [layouts[i] for i in keep]
    ptrs = [grads[i].data_ptr() for i in keep]
    plan = launch_plan(layouts, device, blocks_per_program(layouts[0].block, launch), cache, launch.index_64)
    table = _to_device(torch.tensor(ptrs, dtype=torch.int64), device)
    out = torch.empty(plan.prog_tensor.numel(), dtype=torch.float32, device=device)
    addresses = 0
    for ptr in ptrs:
        addresses |= ptr
    kernel.launch_square_sum(
        plan.device_shapes, table, plan.prog_tensor, plan.block_ids, out, grad_dtype=grads[0].dtype,
        block=plan.layouts[0].block, blocks_per_program=plan.blocks_per_program, index_64=plan.index_64,
        check_edges=_check_edges(plan), aligned=addresses % 16 == 0 and plan.rows_aligned,
        num_warps=launch.num_warps)
    return out.sum()


class PreparedStep:
    """A launch whose per-tensor facts stay from one step to the next: SparseAdamW's fast path.

    Made from one step's updates and the row each reads (`row_ids`, into the `rows` that each `run` brings). The
    plan, the param and state addresses, the index mixes and the row ids are kept; each `run` brings only the new
    gradient addresses and the step's rows. The caller checks that params and states are still the ones given here.
    It holds no gradient: they are freed between steps.
    """

    def __init__(self, updates, row_ids: List[int], cache: Dict, launch: LaunchConfig = DEFAULT_LAUNCH):
        self.kept = _live(updates)
        kept = [updates[i] for i in self.kept]
        self.launch = launch
        self.dtypes = _Dtypes.of(kept[0]) if kept else None
        self.device = updates[0].param.device
        self.plan = _plan(kept, cache, launch) if kept else None
        template: List[int] = []  # step rows, gradient addresses left 0
        self.static_addresses = 0
        for i, u in zip(self.kept, kept):
            p, m, v = u.param.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()
            self.static_addresses |= p | m | v
            template += (p, 0, m, v, index_mix(u.index), row_ids[i])
        self.template = array("q", template)
        if len(self.kept) == len(updates):
            self.kept = None  # run() need not pick

    def run(self, grad_ptrs: List[int], rows: Sequence[StepRow], grad_scale=None) -> None:
        """grad_ptrs: of all the updates given at construction, in their order; rows: this step's rows; grad_scale
        as for `step`."""
        if self.plan is None:
            return
        if self.kept is not None:
            grad_ptrs = [grad_ptrs[i] for i in self.kept]
        dyn = array("q", self.template)
        dyn[1::6] = array("q", grad_ptrs)
        addresses = self.static_addresses
        for g in grad_ptrs:
            addresses |= g
        if grad_scale is not None:
            grad_scale = grad_scale.to(self.device)
        _run(self.plan, self.dtypes, _upload(dyn, rows, self.device), addresses % 16 == 0, self.launch, grad_scale)
