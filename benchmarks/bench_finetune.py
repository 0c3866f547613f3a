"""End-to-end training step of a LLaMA-7B-shaped (or SmolLM2-135M-shaped) model (random init, 20% of 16x16 blocks
pruned), side by side.

Contenders, in one process on one card:
  torch_fused        torch AdamW(fused=True), no masking (the speed and memory a dense fine-tune would have)
  wanda_gradmask     torch AdamW(fused=True) + `grad[W == 0] = 0` after every backward (Wanda's trainer, as the
                     user's guide runs it)
  gradmask_once_bool torch AdamW(fused=True) + the gradients masked once per optimizer step with a bool mask (the
                     strongest version of gradient masking: accumulated gradients are linear)
  reapply_bool       torch AdamW(fused=True) + the weights re-masked after every step with a bool mask (the strongest
                     version of mask reapply)
  sparse_adamw       SparseAdamW with block masks (compact state; stochastic rounding for bf16 params)
  sparse_adamw_bf16_state   the same with bf16 exp_avg and exp_avg_sq
These take --batch, --ga and --grad_ckpt. Two more fix their own configuration, for an effective batch of
--effective_batch sequences:
  guide              the user's guide as written: torch AdamW(fused=True) + `grad[W == 0] = 0` after every
                     backward, gradient checkpointing, batch 1, GA = effective batch
  plan               the fine-tune's default: SparseAdamW with states in the params' dtype (bf16 for --param_dtype
                     bf16; fp32 states were the default before commit 3f1f814), Liger-Kernel where installed, and
                     the micro-batch and checkpointing its memory plan measures (sparse_adamw.pipeline.memory_plan)
                     within --max_memory_gb (or the free memory)
  plan_bf16_state    the same with bf16 states whatever the params' dtype (the fine-tune's --state_dtype bfloat16)
  plan_no_liger      plan_bf16_state without Liger-Kernel
  plan_distill       plan_bf16_state, distilling from a dense bf16 teacher of the same shape (0.5 LM + 0.5 KL)
  lora_distill       the fine-tune's --lora, distilled: masked LoRA adapters (rank 16, alpha 32, every decoder
                     Linear) on the frozen model, SparseAdamW over the adapters (bf16 states), the teacher sharing
                     the student's weights (the student masks its pruned blocks in each product), micro-batch and
                     checkpointing from the memory plan. The bench's teacher is the pruned weights themselves: time
                     and memory do not depend on the values
  lora               the same on the LM loss alone (no teacher)

Reports tokens/s, forward+backward per micro-step, optimizer.step() (as timed in the loop, its host time
included, and with that host time overlapped by earlier GPU work), masking per optimizer step (gradients, or
reapply_bool's weights), and peak memory. Prints a markdown table last and appends CSV rows.

    # issue 6: 4 layers, fp32 params under bf16 autocast, GA 8, contenders alternating step by step
    python benchmarks/bench_finetune.py --layers 4 --param_dtype fp32 --ga 8 --interleave
    # issue 7: the whole 7B shape, bf16 params and grads, gradient checkpointing
    python benchmarks/bench_finetune.py --layers 32 --param_dtype bf16 --ga 1 --grad_ckpt
    # issue 15: the guide against the default plan on an 80 GB card (emulated: the allocator refuses more)
    python benchmarks/bench_finetune.py --layers 32 --param_dtype bf16 --contenders guide plan plan_bf16_state \
        --max_memory_gb 80
    # the SmolLM2-135M shape at batch 8: the fine-tune before the plan (no Liger) and with it
    python benchmarks/bench_finetune.py --shape smollm2 --param_dtype bf16 --batch 8 --ga 1 \
        --contenders sparse_adamw plan plan_no_liger

Every row also gives % of the bf16 matrix rate measured in the same run (an 8192^3 matmul): 6 (lora: 4) x parameters x
tokens/s over that rate (attention's own FLOPs are not counted, so this understates the work done).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_csv, environment, markdown_table, median_ms, prune_randomly  # noqa: E402

from sparse_adamw import SparseAdamW  # noqa: E402
from sparse_adamw.masks import expand_block_mask  # noqa: E402
from sparse_adamw.pipeline.distill import DistillConfig, distill_loss  # noqa: E402
from sparse_adamw.pipeline.lora import ALL_LINEAR, DEFAULT_ALPHA_PER_R, DEFAULT_R, LoraSettings, prepare  # noqa: E402
from sparse_adamw.pipeline.memory_plan import (budget_bytes, cap_memory, choose, optimizer_state_bytes,  # noqa: E402
                                               set_checkpointing)
from sparse_adamw.pipeline.models import liger_supports  # noqa: E402


def apply_liger(model) -> None:
    """Liger-Kernel's fused kernels on this model instance, as the Trainer's use_liger_kernel applies them."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)

CONTENDERS = ("torch_fused", "wanda_gradmask", "gradmask_once_bool", "reapply_bool", "sparse_adamw",
              "sparse_adamw_bf16_state",
              "guide", "plan", "plan_bf16_state", "plan_no_liger", "plan_distill", "lora", "lora_distill")
# LlamaConfig fields, and the layer count when --layers is not given
SHAPES = {
    "llama7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000, max_position_embeddings=4096), 4),
    "smollm2": (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True), 30),
}


def matmul_tflops() -> float:
    """The card's bf16 matrix rate, measured: an 8192^3 product."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * 8192 ** 3 / ms / 1e9


def build_model(shape, layers, param_dtype, grad_ckpt, sparsity, seed=0):
    """A random-init LlamaForCausalLM of `shape` (SHAPES), and random block masks applied to its decoder Linears."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **SHAPES[shape][0])
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=param_dtype)
    set_checkpointing(model, grad_ckpt, {"use_reentrant": False})
    model.config.use_cache = False
    masks = prune_randomly(model, sparsity, seed)
    return model, masks


class Contender:
    """One model + optimizer; `train_step()` runs GA micro-steps and the optimizer step, recording timings."""

    def __init__(self, name, args):
        self.name, self.args = name, args
        dtype = torch.float32 if args.param_dtype == "fp32" else torch.bfloat16
        self.batch, self.ga, self.grad_ckpt = args.batch, args.ga, args.grad_ckpt
        if name == "guide":
            self.batch, self.ga, self.grad_ckpt = 1, args.effective_batch, True
        self.model, masks = build_model(args.shape, args.layers, dtype, self.grad_ckpt, args.sparsity)
        self.vocab = self.model.config.vocab_size
        self.teacher = None
        if name == "plan_distill":
            self.teacher = build_model(args.shape, args.layers, torch.bfloat16, False, 0.0, seed=1)[0]
            self.teacher.eval().requires_grad_(False)
        if name == "lora_distill":  # one copy of the weights for both: a module tree of its own, the same tensors
            self.teacher = copy.deepcopy(self.model, memo={id(p): p for p in self.model.parameters()})
            self.teacher.eval().requires_grad_(False)
        self.liger = name in ("plan", "plan_bf16_state", "plan_distill", "lora", "lora_distill") and liger_supports(
            self.model)
        if self.liger:
            apply_liger(self.model)
            if self.teacher is not None:
                apply_liger(self.teacher)
        params = self.model.parameters()
        if name.startswith("lora"):
            names = {p: n for n, p in self.model.named_parameters()}
            settings = LoraSettings(DEFAULT_R, DEFAULT_ALPHA_PER_R * DEFAULT_R, 0.0, ALL_LINEAR)
            _, not_shared = prepare(self.model, self.teacher, {names[p]: m for p, m in masks.items()}, (16, 16),
                                    settings, share=True)
            assert self.teacher is None or not_shared is None, not_shared
            masks, state_dtype = {}, torch.bfloat16  # the adapters train, with no masks
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = SparseAdamW(params, lr=2e-4, weight_decay=0.0, state_dtype=state_dtype)
        elif name.startswith(("sparse_adamw", "plan")):
            # `plan` as the fine-tune defaults: the states take the weights' dtype
            bf16_state = name.endswith("bf16_state") or name in ("plan_no_liger", "plan_distill") or (
                name == "plan" and dtype == torch.bfloat16)
            state_dtype = torch.bfloat16 if bf16_state else torch.float32
            self.opt = SparseAdamW(params, lr=5e-5, weight_decay=0.0, masks=masks, state_dtype=state_dtype)
        else:
            self.opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=True)
        self.autocast = dtype == torch.float32
        self.plan = None
        if name.startswith(("plan", "lora")):
            self.plan = self._measure_plan(masks, state_dtype)
            self.batch, self.ga = self.plan.chosen.micro_batch, self.plan.gradient_accumulation_steps
            self.grad_ckpt = self.plan.chosen.checkpointing
            set_checkpointing(self.model, self.grad_ckpt, {"use_reentrant": False})
        self.masked = list(masks) if name in ("wanda_gradmask", "guide") else []
        self.pruned = ([(p, ~expand_block_mask(m, p.shape)) for p, m in masks.items()]  # 1 byte per weight
                       if name in ("gradmask_once_bool", "reapply_bool") else [])
        self.tokens = torch.randint(0, self.vocab, (self.batch, args.seq), device="cuda")
        self.timings = {"fwd_bwd": [], "mask": [], "opt": [], "step": []}

    def _measure_plan(self, masks, state_dtype):
        """The memory plan, as the fine-tune measures it: forward and backward at each candidate micro-batch with
        the optimizer state held in a placeholder."""
        names = {p: n for n, p in self.model.named_parameters()}
        state = optimizer_state_bytes(self.model, {names[p]: m for p, m in masks.items()}, (16, 16), state_dtype)

        def run(candidate):
            set_checkpointing(self.model, candidate.checkpointing, {"use_reentrant": False})
            ids = torch.randint(0, self.vocab, (candidate.micro_batch, self.args.seq), device="cuda")
            self.loss(ids).backward()

        plan = choose(run, per_process=self.args.effective_batch, seq_len=self.args.seq, device=torch.device("cuda"),
                      budget=budget_bytes(torch.device("cuda"), self.args.max_memory_gb),
                      reserved={"optimizer state": state}, clear=lambda: self.model.zero_grad(set_to_none=True))
        print(plan.describe(), flush=True)
        return plan

    def loss(self, ids):
        """The micro-batch's loss: the model's own, or with a teacher the distillation loss the fine-tune uses."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.teacher is None:
                return self.model(input_ids=ids, labels=ids).loss
            return distill_loss(self.model, self.teacher, {"input_ids": ids, "labels": ids}, DistillConfig(0.5))

    def train_step(self, record: bool) -> None:
        def event():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        ga = self.ga
        start = event()
        fwd_bwd = mask = 0.0
        for _ in range(ga):
            a = event()
            loss = self.loss(self.tokens) / ga
            loss.backward()
            b = event()
            for p in self.masked:  # Wanda's trainer: zero the gradients of pruned weights after every backward
                p.grad[p == 0] = 0
            c = event()
            c.synchronize()
            fwd_bwd += a.elapsed_time(b)
            mask += b.elapsed_time(c)
        if self.pruned and self.name == "gradmask_once_bool":  # once per optimizer step, on the accumulated grads
            m0 = event()
            for p, pruned in self.pruned:
                p.grad.masked_fill_(pruned, 0)
            m1 = event()
            m1.synchronize()
            mask += m0.elapsed_time(m1)
        o0 = event()
        self.opt.step()
        o1 = end = event()
        if self.name == "reapply_bool":  # the weights, after the step
            for p, pruned in self.pruned:
                p.data.masked_fill_(pruned, 0)
            end = event()
            end.synchronize()
            mask += o1.elapsed_time(end)
        o1.synchronize()
        self.opt.zero_grad(set_to_none=True)
        if record:
            for key, value in (("fwd_bwd", fwd_bwd / ga), ("mask", mask), ("opt", o0.elapsed_time(o1)),
                               ("step", start.elapsed_time(end))):
                self.timings[key].append(value)

    def opt_device_ms(self) -> float:
        """optimizer.step() with its host time overlapped by earlier GPU work (as after an asynchronous backward),
        on the gradients of one more micro-step."""
        self.loss(self.tokens).backward()
        for p in self.masked:
            p.grad[p == 0] = 0
        ms = median_ms(self.opt.step, warmup=1, reps=5, device_only=True)
        self.opt.zero_grad(set_to_none=True)
        return ms

    def row(self, peak) -> dict:
        med = {k: statistics.median(v) for k, v in self.timings.items()}
        state = sum(t.numel() * t.element_size() for s in self.opt.state.values() for k, t in s.items()
                    if k in ("exp_avg", "exp_avg_sq"))
        a = self.args
        tokens_per_s = self.ga * self.batch * a.seq / med["step"] * 1e3
        n_params = sum(p.numel() for p in self.model.parameters())
        flops_per_param = 4 if self.name.startswith("lora") else 6  # frozen weights: no weight gradient
        return dict(contender=self.name, batch=self.batch, ga=self.ga, grad_ckpt=self.grad_ckpt, liger=self.liger,
                    tokens_per_s=round(tokens_per_s),
                    pct_matrix_rate=round(100 * flops_per_param * n_params * tokens_per_s / (a.tflops * 1e12), 1),
                    step_ms=round(med["step"], 1), fwd_bwd_ms=round(med["fwd_bwd"], 1),
                    gradmask_per_step_ms=round(med["mask"], 2), opt_step_ms=round(med["opt"], 2),
                    opt_step_device_ms=round(self.device_ms, 2),
                    state_gib=round(state / 2**30, 2), peak_gib=peak[0], peak_reserved_gib=peak[1],
                    plan_peak_gib=round(min(t.peak for t in self.plan.trials if t.candidate == self.plan.chosen)
                                        / 2**30, 2) if self.plan else "")


def run_sequential(args):
    """One contender at a time, each on a fresh model: peak memory per contender."""
    rows = []
    for name in args.contenders:
        torch.cuda.reset_peak_memory_stats()
        c = Contender(name, args)
        for it in range(args.warmup + args.steps):
            c.train_step(record=it >= args.warmup)
        peak = (round(torch.cuda.max_memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2))
        c.device_ms = c.opt_device_ms()
        rows.append(c.row(peak))
        print(f"  {name}: {rows[-1]['tokens_per_s']} tokens/s, peak {rows[-1]['peak_gib']} GiB", flush=True)
        del c
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_interleaved(args):
    """All contenders alive at once, stepping in turn: clock and thermal drift hit every contender alike."""
    contenders = [Contender(name, args) for name in args.contenders]
    for it in range(args.warmup + args.steps):
        for c in contenders:
            c.train_step(record=it >= args.warmup)
    for c in contenders:
        c.device_ms = c.opt_device_ms()
    return [c.row(("n/a", "n/a")) for c in contenders]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: llama7b 4, smollm2 30)")
    parser.add_argument("--param_dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 params train under bf16 autocast; bf16 params and grads train as they are")
    parser.add_argument("--ga", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--effective_batch", type=int, default=8, help="sequences per optimizer step: guide, plan")
    parser.add_argument("--max_memory_gb", type=float, default=None,
                        help="the allocator refuses more than this (GiB), and the plan fits in it less 5%%")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--interleave", action="store_true",
                        help="keep every contender's model on the card and alternate their steps (fair timing; "
                             "no per-contender peak memory)")
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "bench_finetune.csv"))
    args = parser.parse_args()
    if args.layers is None:
        args.layers = SHAPES[args.shape][1]

    env = environment()
    if args.max_memory_gb:
        cap_memory(torch.device("cuda"), args.max_memory_gb)
    args.tflops = matmul_tflops()
    print(f"bf16 matrix rate measured here: {args.tflops:.0f} TFLOP/s", flush=True)
    results = run_interleaved(args) if args.interleave else run_sequential(args)
    rows = [dict(env, shape=args.shape, layers=args.layers, param_dtype=args.param_dtype, seq=args.seq,
                 interleaved=args.interleave, max_memory_gb=args.max_memory_gb or "", matrix_tflops=round(args.tflops),
                 **r) for r in results]
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    append_csv(args.csv, rows)
    print()
    print(f"{env['gpu']} (host: {env['host_cpu']}), torch {env['torch']}, triton {env['triton']}; {args.shape} dims, "
          f"{args.layers} layers, "
          f"{args.param_dtype} params, seq {args.seq}, {args.sparsity:.0%} of 16x16 blocks pruned; cap "
          f"{args.max_memory_gb or 'none'} GiB; bf16 matrix rate {args.tflops:.0f} TFLOP/s")
    print(markdown_table(rows, ["contender", "batch", "ga", "grad_ckpt", "liger", "tokens_per_s", "pct_matrix_rate",
                                "step_ms", "fwd_bwd_ms", "gradmask_per_step_ms", "opt_step_ms", "state_gib",
                                "peak_gib", "peak_reserved_gib", "plan_peak_gib"]))


if __name__ == "__main__":
    main()
