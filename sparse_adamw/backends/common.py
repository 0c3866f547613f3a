"""What every backend takes, and the launch plan that the fused kernels (Triton, C++/CUDA) share.

A `ParamUpdate` is backend-neutral: a parameter's tensors, its `BlockLayout` and its step's hyper-parameters. Each
backend builds its own tables from it; in every backend the scalars come from `sparse_adamw.reference.
step_constants` and the rounding seeds from `sparse_adamw.reference.rounding_seed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from ..layout import BlockLayout, program_map
from ..reference import StepConstants, rounding_seed, step_constants


class ParamUpdate(NamedTuple):
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    layout: BlockLayout
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    seed: Optional[int]  # None: round to nearest; else stochastic rounding of bf16 params and exp_avg_sq
    index: int = 0  # the parameter's position in the optimizer: with seed and step, it makes the rounding seed

    @property
    def rounding_seed(self) -> Optional[int]:
        return None if self.seed is None else rounding_seed(self.seed, self.step, self.index)

    @property
    def stochastic(self) -> bool:
        """Whether anything is rounded stochastically: a seed, and a bf16 param or exp_avg_sq."""
        return self.seed is not None and torch.bfloat16 in (self.param.dtype, self.exp_avg_sq.dtype)

    @property
    def row(self) -> "StepRow":
        return StepRow(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.step, self.seed)

    @property
    def constants(self) -> StepConstants:
        return self.row.constants


class StepRow(NamedTuple):
    """What a step of one parameter needs besides its tensors: several parameters of a launch may share one."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    seed: Optional[int]

    @property
    def constants(self) -> StepConstants:
        return step_constants(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.step)


@dataclass(frozen=True)
class LaunchConfig:
    """How the fused kernels split the work; the defaults are the measured best (benchmarks/RESULTS.md).

    For tuning and tests: `SparseAdamW(..., launch=LaunchConfig(...))`.
    """

    blocks_per_program: int = 0  # live blocks per program; 0: about elements_per_program elements' worth
    num_warps: int = 8  # Triton
    threads: int = 128  # CUDA threads per program
    index_64: bool = False  # 64-bit offsets even where every tensor of a launch fits 32-bit ones


DEFAULT_LAUNCH = LaunchConfig()
_INT32_LIMIT = 2**31


class LaunchPlan(NamedTuple):
    """The static part of a fused launch, shared by the Triton and compiled backends, cached per set of layouts.

    shapes: int64 (T, 8) CPU table, one row per tensor: rows, cols, numel, block columns, live blocks, first program,
    row shift (a shard that starts mid-block), flat index of element 0 in the whole parameter; device_shapes: the
    same on the launch's device.
    prog_tensor, block_ids: int32 on the launch's device: the tensor of each program (K live blocks of one tensor),
    and K live block ids per program (row-major ids, zero-padded past a tensor's last live block).
    """

    layouts: List[BlockLayout]
    shapes: torch.Tensor
    device_shapes: torch.Tensor
    prog_tensor: torch.Tensor
    block_ids: torch.Tensor
    blocks_per_program: int
    index_64: bool  # some offset of the launch needs 64 bits
    whole_blocks: bool  # no partial block, no shard starting mid-block: no edge checks needed
    rows_aligned: bool  # block width and every column count a multiple of 16 (elements): rows start aligned


def launch_plan(layouts: Sequence[BlockLayout], device: torch.device, blocks_per_program: int, cache: Dict,
                force_index_64: bool = False) -> LaunchPlan:
    """The LaunchPlan of `layouts` (cached in `cache` while the same layout objects come back)."""
    k = blocks_per_program
    key = ("plan", k, force_index_64, device) + tuple(id(lay) for lay in layouts)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit.layouts, layouts)):
        return hit
    bh, bw = layouts[0].block
    shapes, n_prog, index_64, whole, aligned = [], 0, force_index_64, True, bw % 16 == 0
    for lay in layouts:
        shapes.append([lay.rows, lay.cols, lay.numel, lay.n_block_cols, lay.n_live, n_prog, lay.row_shift,
                       lay.index_base])
        whole &= not (lay.rows % bh or lay.cols % bw or lay.numel != lay.rows * lay.cols or lay.row_shift)
        aligned &= lay.cols % 16 == 0
        # Offsets reach past the last row/column in edge blocks, and past the last slot in the last program.
        index_64 |= max((lay.row_shift + lay.rows + bh) * (lay.cols + bw), (lay.n_live + k) * bh * bw) >= _INT32_LIMIT
        n_prog += math.ceil(lay.n_live / k)
    index_64 |= n_prog * k >= _INT32_LIMIT
    prog_tensor, block_ids = program_map(layouts, k)
    shapes = torch.tensor(shapes, dtype=torch.int64)
    plan = LaunchPlan(list(layouts), shapes, shapes.to(device), prog_tensor.to(device), block_ids.to(device), k,
                      index_64, whole, aligned)
    cache[key] = plan
    return plan
