"""How often the Triton kernel compiled for a GPU parts from the reference, from the same values each step.

Triton contracts multiply-adds into FMAs and uses fast sqrt and division, where the reference (and the CUDA backend,
built with --fmad=false) rounds every product. This steps SparseAdamW (Triton, on the GPU) and
sparse_adamw_reference (on the CPU) from the same params and states every step, and counts the live values that
differ, with the kernel's FMA contraction on (as shipped) and off.

    python benchmarks/triton_vs_reference.py
    TRITON_INTERPRET=1 python benchmarks/triton_vs_reference.py --device cpu --shapes 45x70 32x48 19x33

The second, on the interpreter, checks this script: no bf16 value or state differs, and about 1% of fp32 params
differ by an ulp (the kernel multiplies by 1 / sqrt(1 - beta2^t) where the reference divides).
"""
from __future__ import annotations

import argparse

import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask, sparse_adamw_reference
from sparse_adamw.layout import compact_to_dense
from sparse_adamw.masks import expand_block_mask
from sparse_adamw.reference import rounding_seed
from sparse_adamw.triton_kernels import sparse_adamw as kernels

DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
KINDS = ("param", "exp_avg", "exp_avg_sq")


class _NoFusion:
    """The step kernel, launched with FMA contraction off."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, "enable_fp_fusion": False})


def _states(opt, param, mask, dtype):
    state = opt.state[param]
    if "exp_avg" not in state:
        return [torch.zeros(param.shape, dtype=dtype)] * 2
    return [compact_to_dense(state[k].cpu(), mask.cpu(), param.shape, (16, 16)) for k in ("exp_avg", "exp_avg_sq")]


def count_apart(dtype, state_dtype, steps, shapes, device, lr=1e-4):
    """{kind: (values that differ, values compared)} over `steps` steps of 3 params in two groups."""
    torch.manual_seed(0)
    masks = [random_block_mask(s, 0.3, device=device) for s in shapes]
    params = [apply_block_mask_((torch.randn(s) * 0.02).to(dtype).to(device), m) for s, m in zip(shapes, masks)]
    seeds = [7, 7, 123456789012]
    opt = SparseAdamW([{"params": params[:2], "seed": seeds[0]}, {"params": params[2:], "seed": seeds[2]}], lr=lr,
                      masks=dict(zip(params, masks)), impl="triton", state_dtype=state_dtype)
    counts = {k: [0, 0] for k in KINDS}
    for step in range(1, steps + 1):
        before = [(p.detach().cpu().clone(), *_states(opt, p, m, state_dtype)) for p, m in zip(params, masks)]
        grads = [torch.randn(p.shape).to(dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        for i, (p, g, mask) in enumerate(zip(params, grads, masks)):
            p0, m0, v0 = before[i]
            want = sparse_adamw_reference(p0, g, m0, v0, step=step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                                          weight_decay=0.01, block_mask=mask.cpu(),
                                          rounding_seed=rounding_seed(seeds[i], step, i))
            got = (p.detach().cpu().clone(), *_states(opt, p, mask, state_dtype))
            live = expand_block_mask(mask.cpu(), p.shape, 16)
            for kind, a, b in zip(KINDS, got, want):
                counts[kind][0] += int((a[live] != b[live]).sum())
                counts[kind][1] += int(live.sum())
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--device", default="cuda", help="cpu: Triton's interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", nargs=3, default=["450x700", "320x480", "190x330"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --device cpu under TRITON_INTERPRET=1")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    shipped = kernels._sparse_adamw_kernel
    for fusion in (True, False):
        kernels._sparse_adamw_kernel = shipped if fusion else _NoFusion(shipped)
        for dtype, state_dtype in DTYPE_PAIRS:
            counts = count_apart(dtype, state_dtype, args.steps, shapes, args.device)
            print(f"fusion={fusion} params {dtype} states {state_dtype}: " + ", ".join(
                f"{k} {d} of {n} differ ({d / n:.2e})" for k, (d, n) in counts.items()), flush=True)
    kernels._sparse_adamw_kernel = shipped


if __name__ == "__main__":
    main()
