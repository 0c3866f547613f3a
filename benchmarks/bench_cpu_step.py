"""Time one optimizer.step() on the CPU over the parameters of the 135M default model (SmolLM2-135M shapes).

30 decoder layers (q 576x576, k and v 192x576, o 576x576, gate and up 1536x576, down 576x1536, two norms), the tied
49152x576 embedding and the final norm: 134.5 M parameters. The Linear weights get random 16x16 block masks at the
given sparsity; the embedding and norms are dense. Contenders, in one process, taking turns step by step:
torch.optim.AdamW (foreach, and fused), SparseAdamW with impl="torch" and impl="cpp". Prints a markdown table
last and appends CSV rows (with the load average: these 2 cores are shared).

    python benchmarks/bench_cpu_step.py --sparsity 0.2 --dtype fp32
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_csv, environment, markdown_table  # noqa: E402

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = ("torch_foreach", "torch_fused", "sparse_adamw_torch", "sparse_adamw_cpp")
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def make_params(dtype, sparsity, layers=30, seed=0):
    """(params, masks of the Linear weights); every param has a small random gradient."""
    gen = torch.Generator().manual_seed(seed)
    params, masks = [], {}
    for _ in range(layers):
        for shape in LAYER_SHAPES:
            p = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            masks[p] = random_block_mask(shape, sparsity, generator=gen)
            apply_block_mask_(p, masks[p])
            params.append(p)
        params += [torch.ones(576, dtype=dtype), torch.ones(576, dtype=dtype)]
    params += [(torch.randn(49152, 576, generator=gen) * 0.02).to(dtype), torch.ones(576, dtype=dtype)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return params, masks


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_optimizer(name, params, masks, dtype):
    state_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    if name.startswith("sparse_adamw_"):
        return SparseAdamW(params, lr=1e-4, masks=masks, impl=name.rsplit("_", 1)[1], state_dtype=state_dtype)
    return torch.optim.AdamW(params, lr=1e-4, foreach=name == "torch_foreach", fused=name == "torch_fused")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=DTYPES)
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.2])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "bench_cpu_step.csv"))
    args = parser.parse_args()

    env = dict(environment(), gpu="", cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads())
    print(f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}", flush=True)
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        # bytes per updated element: read p g m v, write p m v (states fp32 for fp32 params, bf16 for bf16)
        per_elem = 28 if dtype == torch.float32 else 14
        for sparsity in args.sparsity:
            params, masks = make_params(dtype, sparsity)
            n = sum(p.numel() for p in params)
            pruned = sum(int((~m).sum()) * 256 for m in masks.values())  # every Linear dim is a multiple of 16
            # Every optimizer is made before any steps (the dense ones fill the pruned blocks), and the contenders
            # take turns, so that load from other processes falls on all of them alike.
            opts = {name: make_optimizer(name, params, masks, dtype) for name in args.contenders}
            times = {name: [] for name in opts}
            for rep in range(args.reps + 1):
                for name, opt in opts.items():
                    elapsed = seconds(opt.step)
                    if rep:  # the first is a warm-up
                        times[name].append(elapsed)
            for name in opts:
                s = statistics.median(times[name])
                moved = (n - (pruned if name.startswith("sparse_adamw") else 0)) * per_elem
                rows.append(dict(env, params=n, dtype=dtype_name, sparsity=sparsity, contender=name,
                                 ms=round(1e3 * s, 1), min_ms=round(1e3 * min(times[name]), 1),
                                 gbs=round(moved / s / 1e9, 1), load_avg=round(os.getloadavg()[0], 1)))
                print(f"  {dtype_name} s={sparsity} {name}: {1e3 * s:.1f} ms", flush=True)
            del opts, params, masks
            gc.collect()
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    append_csv(args.csv, rows)
    print()
    print(f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, {rows[0]['params']:,} params (SmolLM2-135M "
          f"shapes); median and min of {args.reps} steps; GB/s over the bytes each contender must move")
    print(markdown_table(rows, ["dtype", "sparsity", "threads", "contender", "ms", "min_ms", "gbs", "load_avg"]))


if __name__ == "__main__":
    main()
