"""Kernel time alone (torch.profiler) and the compiled kernel's registers and spills, for the Triton step on the
bench_step.py parameters (8 LLaMA-7B layers, random 16x16 block masks). To compare two versions of the kernel,
run it once per checkout, alternating:

    PYTHONPATH=$PWD python benchmarks/kernel_probe.py --label new
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import DTYPES, make_params  # noqa: E402
from tune_triton import kernel_ms  # noqa: E402

from sparse_adamw import SparseAdamW  # noqa: E402
from sparse_adamw.triton_kernels import sparse_adamw as kernels  # noqa: E402


def compiled_registers():
    """(registers, spills) of every compiled variant of the kernel (the cache moved across Triton versions)."""
    fn = kernels._sparse_adamw_kernel
    caches = fn.device_caches if hasattr(fn, "device_caches") else fn.cache
    out = []
    for cache in caches.values():
        for compiled in (cache[0] if isinstance(cache, tuple) else cache).values():
            out.append((getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, dtype in DTYPES.items():
        params, masks = make_params(args.layers, dtype, args.sparsity)
        opt = SparseAdamW(params, lr=1e-4, masks=dict(zip(params, masks)), impl="triton", state_dtype=dtype)
        for _ in range(3):
            opt.step()
        times = [kernel_ms(opt.step, steps=10) for _ in range(args.rounds)]
        print(f"{args.label} {name} s={args.sparsity}: kernel {statistics.median(times):.3f} ms (median of "
              f"{args.rounds}, {min(times):.3f} to {max(times):.3f}); registers, spills: {compiled_registers()}",
              flush=True)
        del opt, params, masks
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
