"""Compare launch settings of the Triton kernel on one card, interleaved: each round times every variant once.

Timing one variant after another drifts by several percent on the same card (clocks, placement), so variants run
in rounds on the same params and optimizer, and each variant's number is its median over rounds.

    python benchmarks/tune_triton.py --dtype bf16 --sparsity 0.2 --rounds 5
    python benchmarks/tune_triton.py --variants default --host   # kernel vs host time, and the host's parts
    ncu --metrics dram__bytes_read.sum python benchmarks/tune_triton.py --profile   # random vs paired masks
    ncu --metrics dram__bytes_read.sum python benchmarks/tune_triton.py --profile --l2_fetch 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import BYTES_PER_LIVE_ELEMENT, DTYPES, make_params  # noqa: E402
from common import copy_bandwidth_gbs, environment, l2_fetch_granularity, median_ms  # noqa: E402

from sparse_adamw import SparseAdamW, apply_block_mask_  # noqa: E402
from sparse_adamw.backends import LaunchConfig, triton_impl  # noqa: E402
from sparse_adamw.triton_kernels import sparse_adamw as kernels  # noqa: E402

# name: (blocks per program (0 = the default, about 4096 elements), warps). Measured and dropped (RESULTS.md):
# a persistent grid with tl.range pipelining, evict-first loads with streaming stores, a 64 or 80 register cap.
VARIANTS = {
    "default": (0, 8),
    "k8_w4": (8, 4),
    "k32_w16": (32, 16),
    "k32_w8": (32, 8),
    "k4_w2": (4, 2),
}


def use(opt, variant):
    blocks_per_program, num_warps = VARIANTS[variant]
    opt.launch = LaunchConfig(blocks_per_program=blocks_per_program, num_warps=num_warps)


def kernel_ms(step, steps=5):
    """Mean device time of the update kernel per step (torch.profiler): the step's time less host overhead."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if "sparse_adamw_kernel" in e.key)
    return total / steps / 1e3


def host_ms(step, steps=20):
    """Host time of one step while the GPU is busy (nothing to wait for): Python, table upload, launch."""
    import time

    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keeps the stream busy for about a second
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize()
    return elapsed


def paired_masks(masks):
    """Masks whose live blocks come in horizontal pairs (64-byte bf16 rows): each pair takes its first block's bit."""
    out = []
    for m in masks:
        pairs = m[:, ::2]
        out.append(pairs.repeat_interleave(2, dim=1)[:, : m.shape[1]].contiguous())
    return out


def host_breakdown(opt) -> None:
    """Split a step's host time (host_ms, printed by the caller): the optimizer's loop, the backend's tables and
    upload, Triton's launch."""
    kernel, step, run = kernels._sparse_adamw_kernel, triton_impl.step, triton_impl.PreparedStep.run

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    try:
        kernels._sparse_adamw_kernel = NoLaunch()
        print(f"  host, without the launch: {host_ms(opt.step):.3f} ms", flush=True)
        triton_impl.step = lambda updates, cache, launch=None: None
        triton_impl.PreparedStep.run = lambda self, grad_ptrs, rows: None
        print(f"  host, the optimizer's loop alone: {host_ms(opt.step):.3f} ms", flush=True)
    finally:
        kernels._sparse_adamw_kernel, triton_impl.step, triton_impl.PreparedStep.run = kernel, step, run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paired", action="store_true", help="also time masks pruned in 16x32 pairs")
    parser.add_argument("--profile", action="store_true", help="two steps of bf16 s=0.2, random then paired masks")
    parser.add_argument("--host", action="store_true", help="also split the default's host time")
    parser.add_argument("--l2_fetch", type=int, help="set the L2 fetch granularity (bytes, 0 to 128) first")
    args = parser.parse_args()
    if args.l2_fetch is not None:
        print(f"L2 fetch granularity: {l2_fetch_granularity(args.l2_fetch)} bytes", flush=True)

    env = environment()
    if args.profile:
        params, masks = make_params(2, torch.bfloat16, 0.2)
        for kind, ms in (("random", masks), ("paired", paired_masks(masks))):
            for p, m in zip(params, ms):
                apply_block_mask_(p, m)
            opt = SparseAdamW(params, lr=1e-4, masks=dict(zip(params, ms)), impl="triton", state_dtype=torch.bfloat16)
            for _ in range(2):
                opt.step()
            torch.cuda.synchronize()
            live = sum(int(m.sum()) * 256 for m in ms)
            print(f"{kind}: {live:,} live elements, {live * BYTES_PER_LIVE_ELEMENT[torch.bfloat16]:,} live bytes per "
                  "step", flush=True)
        return

    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: copy {copy_gbs:.0f} GB/s; torch {env['torch']}, triton {env['triton']}", flush=True)
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        per_elem = BYTES_PER_LIVE_ELEMENT[dtype]
        for sparsity in args.sparsity:
            params, masks = make_params(args.layers, dtype, sparsity)
            kinds = [("random", masks)] + ([("paired", paired_masks(masks))] if args.paired and sparsity else [])
            for kind, ms in kinds:
                for p, m in zip(params, ms):
                    apply_block_mask_(p, m)
                opt = SparseAdamW(params, lr=1e-4, masks=dict(zip(params, ms)), impl="triton",
                                  state_dtype=dtype)
                floor = sum(int(m.sum()) * 256 for m in ms) * per_elem / copy_gbs / 1e6
                times = {v: [] for v in args.variants}
                for _ in range(args.rounds):
                    for v in args.variants:
                        use(opt, v)
                        times[v].append(median_ms(opt.step, warmup=2, reps=10))
                print(f"{dtype_name} s={sparsity} {kind} masks: floor {floor:.3f} ms", flush=True)
                use(opt, "default")
                print(f"  default: kernel {kernel_ms(opt.step):.3f} ms (profiler), host {host_ms(opt.step):.3f} ms "
                      "per step", flush=True)
                if args.host:
                    host_breakdown(opt)
                for v in args.variants:
                    med = statistics.median(times[v])
                    spread = (max(times[v]) - min(times[v])) / med * 100
                    print(f"  {v:20s} {med:7.3f} ms  {100 * floor / med:5.1f}% of copy bw  (spread {spread:.1f}%)",
                          flush=True)
                del opt
            del params, masks
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
