"""Time one optimizer.step() on LLaMA-7B-shaped Linear weights with random 16x16 block masks.

Contenders, side by side in one process on one card: torch AdamW (foreach, fused), fused + mask reapply (a mask in
the weights' dtype, as usually written, and a bool one), gradient masking (Wanda's trainer as the user's guide has
it: per micro-step, at gradient accumulation 8, with the fused step; and the strongest version: once per optimizer
step with a bool mask), SparseAdamW.
Each step is timed twice: on an idle GPU (its host time counts) and with the GPU kept busy while the host issues
it, as the backward pass does in training (device time alone). Prints a markdown table last and appends CSV rows
(card, versions, git SHA, date). tune_triton.py compares the Triton kernel's launch settings.

    python benchmarks/bench_step.py --layers 8 --dtype fp32 bf16 --sparsity 0 0.2 0.5 0.8
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (LLAMA7B_LAYER_SHAPES, append_csv, copy_bandwidth_gbs, environment,  # noqa: E402
                    markdown_table, median_ms)

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask  # noqa: E402
from sparse_adamw.masks import expand_block_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SparseAdamW's states take the params' dtype (torch keeps bf16 states for bf16 params). Bytes moved per live
# element: read p g m v, write p m v.
BYTES_PER_LIVE_ELEMENT = {torch.float32: 28, torch.bfloat16: 14}
# fused_reapply and wanda_gradmask_ga8 are what people run (the user's guide: `grad[W == 0] = 0` after every
# backward, in fp32 masks where reapplied); fused_reapply_bool and gradmask_once_bool are the strongest versions of
# each alternative: a bool mask, and the gradient masked once per optimizer step (accumulated gradients are linear).
CONTENDERS = ("torch_foreach", "torch_fused", "fused_reapply", "fused_reapply_bool", "wanda_gradmask_ga8",
              "gradmask_once_bool", "sparse_adamw_triton", "sparse_adamw_cuda")


def make_params(layers, dtype, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, grads, masks = [], [], []
    for _ in range(layers):
        for shape in LLAMA7B_LAYER_SHAPES:
            mask = random_block_mask(shape, sparsity, generator=gen, device="cuda")
            p = torch.randn(shape, device="cuda", dtype=dtype).mul_(0.02)
            apply_block_mask_(p, mask)
            params.append(p)
            grads.append(torch.randn(shape, device="cuda", dtype=dtype).mul_(1e-3))
            masks.append(mask)
    for p, g in zip(params, grads):
        p.grad = g
    return params, masks


def run_contender(name, params, masks, dtype):
    """Return (ms per optimizer step, the same with its host time overlapped, ms per micro-step or None,
    optimizer-state bytes, peak GiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    micro_ms = None
    if name.startswith("sparse_adamw_"):
        impl = name.rsplit("_", 1)[1]
        opt = SparseAdamW(params, lr=1e-4, masks=dict(zip(params, masks)), impl=impl, state_dtype=dtype)
        step = opt.step
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=name == "torch_foreach", fused=name != "torch_foreach")
        step = opt.step
        if name == "fused_reapply":
            dense = [expand_block_mask(m, p.shape).to(p.dtype) for p, m in zip(params, masks)]

            def step():
                opt.step()
                for p, d in zip(params, dense):
                    p.mul_(d)
        elif name in ("fused_reapply_bool", "gradmask_once_bool"):
            pruned = [~expand_block_mask(m, p.shape) for p, m in zip(params, masks)]  # 1 byte per weight

            def step():
                if name == "gradmask_once_bool":
                    for p, d in zip(params, pruned):
                        p.grad.masked_fill_(d, 0)
                opt.step()
                if name == "fused_reapply_bool":
                    for p, d in zip(params, pruned):
                        p.masked_fill_(d, 0)
        elif name == "wanda_gradmask_ga8":
            def gradmask():
                for p in params:
                    p.grad[p == 0] = 0
            micro_ms = median_ms(gradmask)
            micro_device_ms = median_ms(gradmask, device_only=True)

    ms, device_ms = median_ms(step), median_ms(step, device_only=True)
    if micro_ms is not None:
        ms += 8 * micro_ms
        device_ms += 8 * micro_device_ms
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                if k in ("exp_avg", "exp_avg_sq"))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del opt, step
    gc.collect()
    torch.cuda.empty_cache()
    return ms, device_ms, micro_ms, state, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="LLaMA-7B decoder layers of Linear weights (8 = 1.62 B)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.2, 0.5, 0.8])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "bench_step.csv"))
    args = parser.parse_args()

    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: copy bandwidth {copy_gbs:.0f} GB/s (read + write); torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        per_elem = BYTES_PER_LIVE_ELEMENT[dtype]
        for sparsity in args.sparsity:
            params, masks = make_params(args.layers, dtype, sparsity)
            n = sum(p.numel() for p in params)
            live = sum(int(m.sum()) * 256 for m in masks)  # every shape is a multiple of 16
            floor_ms = live * per_elem / copy_gbs / 1e6
            for label in args.contenders:
                for p, m in zip(params, masks):  # a dense contender before this one filled the pruned blocks
                    apply_block_mask_(p, m)
                ms, device_ms, micro, state, peak = run_contender(label, params, masks, dtype)
                row = dict(env, params=n, dtype=dtype_name, sparsity=sparsity, contender=label,
                           ms=round(ms, 3), micro_step_ms=round(micro, 3) if micro else "",
                           live_gbs=round(live * per_elem / ms / 1e6, 1),
                           pct_copy_bw=round(100 * floor_ms / ms, 1), floor_ms=round(floor_ms, 3),
                           state_gib=round(state / 2**30, 2), peak_gib=round(peak, 2), copy_gbs=round(copy_gbs),
                           device_ms=round(device_ms, 3), pct_copy_bw_device=round(100 * floor_ms / device_ms, 1))
                rows.append(row)
                print(f"  {dtype_name} s={sparsity} {label}: {ms:.2f} ms ({row['pct_copy_bw']}% of floor); host "
                      f"overlapped {device_ms:.2f} ms ({row['pct_copy_bw_device']}%)", flush=True)
            del params, masks
            gc.collect()
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    append_csv(args.csv, rows)
    print()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {rows[0]['params'] if rows else 0:,} params, "
          f"copy {copy_gbs:.0f} GB/s; live GB/s and % of the live-bytes floor at copy bandwidth; device_ms: the "
          "step with its host time overlapped by earlier GPU work, as in training")
    print(markdown_table(rows, ["dtype", "sparsity", "contender", "ms", "micro_step_ms", "floor_ms", "pct_copy_bw",
                                "device_ms", "pct_copy_bw_device", "live_gbs", "state_gib", "peak_gib"]))


if __name__ == "__main__":
    main()
