"""The compiled backends, "cpp" (CPU tensors) and "cuda" (CUDA tensors): one call into the extension per batch.

The call takes the shared `launch_plan` (shape table, program map, live block ids; once per set of layouts), and
per step each tensor's step constants (sparse_adamw.reference.step_constants) and rounding seed. The binding
checks every input and builds the address table (csrc/bindings.cpp). Importing this module compiles nothing;
`load` (called when the backend is selected) loads or builds the extension.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import build
from .common import DEFAULT_LAUNCH, LaunchConfig, launch_plan

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load(name: str) -> None:
    build.extension(cuda=name == "cuda")


def blocks_per_program(block, launch: LaunchConfig) -> int:
    # About 2048 elements per program, as the Triton kernel (16 per thread at 128 threads).
    return launch.blocks_per_program or max(1, 2048 // (block[0] * block[1]))


def step(updates, cache: Dict, launch: LaunchConfig = DEFAULT_LAUNCH, grad_scale=None) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one call. The compiled kernels take
    no `grad_scale`: the gradients are multiplied by it in place first (one more pass over them)."""
    updates = [u for u in updates if u.layout.numel and u.layout.n_live]
    if not updates:
        return
    if grad_scale is not None:
        torch._foreach_mul_([u.grad for u in updates], grad_scale)
    first = updates[0]
    ext = build.extension(cuda=first.param.device.type == "cuda")
    block = first.layout.block
    plan = launch_plan([u.layout for u in updates], first.param.device, blocks_per_program(block, launch), cache,
                       launch.index_64)
    constants = torch.tensor([u.constants for u in updates], dtype=torch.float64)
    seeds = torch.tensor([u.rounding_seed for u in updates] if first.stochastic else [], dtype=torch.int64)
    ext.step([u.param for u in updates], [u.grad for u in updates], [u.exp_avg for u in updates],
             [u.exp_avg_sq for u in updates], plan.shapes, constants, seeds, plan.prog_tensor, plan.block_ids,
             block[0], block[1], plan.blocks_per_program, launch.threads, plan.index_64)
