"""optimizer.step() on the LLaMA-2-7B parameter list without the model: where the step's time goes.

The 291 tensors of LLaMA-2-7B (embeddings, 224 decoder weights with 20% of their 16x16 blocks pruned, norms,
lm_head), bf16 params, grads and compact states, stochastic rounding: the step of bench_finetune.py's 7B run,
timed alone. Prints the whole step on an idle GPU, its device time (host time overlapped, as after an
asynchronous backward), the kernel's time and the host time, split as tune_triton.py --host does.

--probe adds, in interleaved rounds on the decoder weights alone (device time):
  * the same kernel with trivial math (p*decay + g, m + g, v + g): the same loads and stores, a fraction of the
    instructions;
  * stochastic rounding off;
  * the L2 fetch granularity (a CUDA context limit, 64 bytes by default) at 32 bytes, so that a 32-byte bf16
    block row whose neighbour is pruned reads 32 bytes instead of 64;
  * a plain copy timed on an idle and on a busy GPU: how much of "idle" is the GPU waking up, not host time.

    python benchmarks/step_7b.py --probe
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import make_params  # noqa: E402
from common import LLAMA7B_LAYER_SHAPES, environment, l2_fetch_granularity, median_ms  # noqa: E402
from tune_triton import host_breakdown, host_ms, kernel_ms  # noqa: E402

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask  # noqa: E402
from sparse_adamw.triton_kernels import sparse_adamw as kernels  # noqa: E402



def llama7b_params(sparsity=0.2, seed=0):
    """LLaMA-2-7B's parameters in model order, bf16, with random gradients; block masks for the decoder weights."""
    gen = torch.Generator().manual_seed(seed)

    def new(shape, scale=0.02):
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16).mul_(scale)

    params, masks = [new((32000, 4096))], {}
    for _ in range(32):
        for shape in LLAMA7B_LAYER_SHAPES:
            p = new(shape)
            masks[p] = random_block_mask(shape, sparsity, generator=gen, device="cuda")
            apply_block_mask_(p, masks[p])
            params.append(p)
        params += [torch.ones(4096, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    params += [torch.ones(4096, device="cuda", dtype=torch.bfloat16), new((32000, 4096))]
    for p in params:
        p.grad = new(p.shape, 1e-3)
    return params, masks


def light_kernel():
    """The update kernel with its AdamW math replaced by three adds: the same memory traffic, few instructions."""
    path = kernels.__file__
    source = open(path).read()
    math = """    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    return p - step_size * (m / denom), m, v
"""
    if math not in source:
        raise RuntimeError(f"the math of {path} (_adamw) has changed: update light_kernel()")
    light = os.path.join(tempfile.mkdtemp(), "light_sparse_adamw.py")  # Triton reads a kernel's source file
    with open(light, "w") as f:
        f.write(source.replace(math, "    return p * decay + g, m + g, v + g\n"))
    spec = importlib.util.spec_from_file_location("light_sparse_adamw", light)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._sparse_adamw_kernel


def probe(rounds: int) -> None:
    default_l2 = l2_fetch_granularity()
    params, masks = make_params(32, torch.bfloat16, 0.2)
    opts = {sr: SparseAdamW(params, lr=1e-4, masks=dict(zip(params, masks)), impl="triton",
                            state_dtype=torch.bfloat16, stochastic_rounding=sr) for sr in (True, False)}
    real, light = kernels._sparse_adamw_kernel, light_kernel()
    variants = {  # name: (stochastic rounding, kernel, L2 fetch granularity)
        "AdamW, stochastic rounding (shipped)": (True, real, default_l2),
        "AdamW, round to nearest": (False, real, default_l2),
        "trivial math, stochastic rounding": (True, light, default_l2),
        "trivial math, round to nearest": (False, light, default_l2),
        "AdamW, stochastic rounding, L2 fetch 32 B": (True, real, 32),
        "trivial math, round to nearest, L2 fetch 32 B": (False, light, 32),
    }
    times = {v: [] for v in variants}
    try:
        for _ in range(rounds):
            for name, (sr, kernel, l2) in variants.items():
                kernels._sparse_adamw_kernel = kernel
                l2_fetch_granularity(l2)
                times[name].append(median_ms(opts[sr].step, warmup=1, reps=8, device_only=True))
    finally:
        kernels._sparse_adamw_kernel = real
        l2_fetch_granularity(default_l2)
    print(f"The 224 decoder weights alone, device time, medians of {rounds} interleaved rounds "
          f"(L2 fetch granularity by default: {default_l2} B):", flush=True)
    for name in variants:
        print(f"  {name:48s} {statistics.median(times[name]):7.3f} ms  "
              f"(rounds {min(times[name]):.3f} to {max(times[name]):.3f})", flush=True)
    del opts, params, masks
    torch.cuda.empty_cache()

    src = torch.empty(10 * 2**30 // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)

    def copies():
        for _ in range(3):
            dst.copy_(src)

    idle = statistics.median(median_ms(copies, reps=10) for _ in range(rounds))
    busy = statistics.median(median_ms(copies, reps=10, device_only=True) for _ in range(rounds))
    print(f"Three 10 GiB copies (no host time to speak of): idle GPU {idle:.3f} ms, busy GPU {busy:.3f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", action="store_true", help="also the variants and the copy described above")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_sha']}", flush=True)
    params, masks = llama7b_params()
    opt = SparseAdamW(params, lr=1e-4, masks=masks, impl="triton", state_dtype=torch.bfloat16)
    n = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n / 1e9:.2f} B params; optimizer.step(): idle GPU "
          f"{median_ms(opt.step, reps=10):.3f} ms, device {median_ms(opt.step, reps=10, device_only=True):.3f} ms, "
          f"kernel {kernel_ms(opt.step):.3f} ms (profiler), host {host_ms(opt.step):.3f} ms", flush=True)
    host_breakdown(opt)
    del opt, params, masks
    torch.cuda.empty_cache()
    if args.probe:
        probe(args.rounds)


if __name__ == "__main__":
    main()
