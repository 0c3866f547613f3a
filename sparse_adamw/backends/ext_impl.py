"""The compiled backends, "cpp" (CPU tensors) and "cuda" (CUDA tensors): one call into the extension per batch.

The tables are the Triton kernel's: once per set of layouts, each tensor's shape row, the tensor of each program
(K live blocks of one tensor) and K live block ids per program; per step, each tensor's hyper-parameters and
rounding seed. The binding checks every input and builds the address table (csrc/bindings.cpp). Importing this
module compiles nothing; `load` (called when the backend is selected) loads or builds the extension.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..layout import program_map
from . import build

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch parameters; 0 blocks per program picks about 2048 elements. Benchmarks set these to sweep them.
BLOCKS_PER_PROGRAM = 0
THREADS = 128  # CUDA threads per program
INDEX_64 = False  # tests set it to run the CUDA kernel's 64-bit offsets on small tensors


def load(name: str) -> None:
    build.extension(cuda=name == "cuda")


def _blocks_per_program(block) -> int:
    # About 2048 elements per program, as the Triton kernel (16 per thread at 128 threads).
    return max(1, 2048 // (block[0] * block[1]))


def _plan(updates, cache: Dict, k: int):
    """Static part of a call, cached per set of layouts: shape rows, program -> tensor map, block ids."""
    key = ("ext_plan", k) + tuple(id(u.layout) for u in updates)
    hit = cache.get(key)
    if hit is not None and all(a is u.layout for a, u in zip(hit[0], updates)):
        return hit[1:]
    shapes = [[u.layout.rows, u.layout.cols, u.layout.numel, u.layout.n_live, u.layout.row_shift,
               u.layout.index_base] for u in updates]
    prog_tensor, block_ids = program_map([u.layout for u in updates], k)
    device = updates[0].param.device
    cache[key] = ([u.layout for u in updates], torch.tensor(shapes, dtype=torch.int64), prog_tensor.to(device),
                  block_ids.to(device))
    return cache[key][1:]


def step(updates, cache: Dict) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one call."""
    updates = [u for u in updates if u.layout.numel and u.layout.n_live]
    if not updates:
        return
    first = updates[0]
    ext = build.extension(cuda=first.param.device.type == "cuda")
    block = first.layout.block
    k = BLOCKS_PER_PROGRAM or _blocks_per_program(block)
    shapes, prog_tensor, block_ids = _plan(updates, cache, k)
    hyper = torch.tensor([[u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.step] for u in updates],
                         dtype=torch.float64)
    stochastic = first.rounding_seed is not None and first.param.dtype == torch.bfloat16
    seeds = torch.tensor([u.rounding_seed for u in updates] if stochastic else [], dtype=torch.int64)
    ext.step([u.param for u in updates], [u.grad for u in updates], [u.exp_avg for u in updates],
             [u.exp_avg_sq for u in updates], shapes, hyper, seeds, prog_tensor, block_ids,
             block[0], block[1], k, THREADS, INDEX_64)
