"""How far bf16 optimizer states, rounded to nearest, drift from fp32 ones over a long run (CPU, seconds).

    python benchmarks/bf16_state_drift.py                 # 3000 steps, gradients steady and falling 10x
    python benchmarks/bf16_state_drift.py --impl triton   # the Triton kernel (TRITON_INTERPRET=1 on a CPU)

With beta2 = 0.999, one step can lower exp_avg_sq by at most 0.1% of its value. Rounding to nearest in bf16
undoes any change smaller than half a bf16 step, which is 0.2% to 0.4% of the value, so a bf16 exp_avg_sq never
decreases. It only rises, when a squared gradient exceeds 3 to 5 times it. SparseAdamW therefore rounds a bf16
exp_avg_sq stochastically (docs/design.md, "bf16 optimizer states"). Here SparseAdamW with fp32 states, with bf16
states rounded to nearest (`stochastic_rounding=False`) and with bf16 states rounded stochastically (the
default), fp32 params otherwise alike, step the same random gradients, whose scale stays at 1 (`steady`) or
falls from 1 to 0.1 over the run (`falling`). At a few steps the script prints, for each bf16 run, its
exp_avg_sq over the fp32 one (median and 5th/95th percentiles over the elements), the share of elements whose
exp_avg_sq ever decreased, and how far its params are from the fp32 run's, relative to how far those moved.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from sparse_adamw import SparseAdamW  # noqa: E402


def run(scenario: str, steps: int, impl: str, shape=(64, 64), seed=0):
    torch.manual_seed(seed)
    start = torch.zeros(shape)
    runs = {"fp32": (torch.float32, None), "nearest": (torch.bfloat16, False), "stochastic": (torch.bfloat16, None)}
    params = {name: torch.nn.Parameter(start.clone()) for name in runs}
    opts = {name: SparseAdamW([params[name]], lr=1e-4, weight_decay=0.0, masks=None, state_dtype=dtype,
                              stochastic_rounding=rounding, impl=impl) for name, (dtype, rounding) in runs.items()}
    previous = {name: None for name in ("nearest", "stochastic")}
    decreased = {name: torch.zeros(shape, dtype=torch.bool) for name in previous}
    report = sorted({steps // 10, steps // 3, 2 * steps // 3, steps})
    for t in range(1, steps + 1):
        scale = 10 ** (-(t - 1) / steps) if scenario == "falling" else 1.0
        grad = torch.randn(shape) * scale
        for name, p in params.items():
            p.grad = grad.clone()
            opts[name].step()
        v32 = opts["fp32"].state[params["fp32"]]["exp_avg_sq"]
        for name in previous:
            v16 = opts[name].state[params[name]]["exp_avg_sq"].float()
            if previous[name] is not None:
                decreased[name] |= v16 < previous[name]
            previous[name] = v16
            if t in report:
                ratio = v16 / v32
                apart = (params[name] - params["fp32"]).norm() / (params["fp32"] - start).norm()
                print(f"{scenario:8s} step {t:6d}, {name:10s}: exp_avg_sq bf16/fp32 median {ratio.median():.2f} "
                      f"(p5 {ratio.quantile(0.05):.2f}, p95 {ratio.quantile(0.95):.2f}); ever decreased "
                      f"{decreased[name].float().mean():.1%}; params apart {apart.item():.3f} of the fp32 run's "
                      f"movement", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--impl", default="torch", help="SparseAdamW backend (torch, triton, cpp)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, backend {args.impl}, beta2 0.999, lr 1e-4, fp32 params")
    for scenario in ("steady", "falling"):
        run(scenario, args.steps, args.impl)


if __name__ == "__main__":
    main()
