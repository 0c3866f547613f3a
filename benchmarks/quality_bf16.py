"""Does bf16 training learn? The pruned SmolLM2-135M fine-tuned three ways with SparseAdamW, same batches:

  fp32          fp32 params (the quality reference)
  bf16_sr       bf16 params, stochastic rounding (the default for bf16)
  bf16_nearest  bf16 params, round to nearest (updates under half an ulp are lost)

Every model is evaluated in fp32 on the same validation windows. Prints a markdown table last.

    python -m sparse_adamw.pipeline.prune --device cuda          # once, makes the pruned default model
    python benchmarks/quality_bf16.py --model out/smollm2-135m/block_16x16_20sparsity/wanda/pruned_model
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_csv, environment, markdown_table  # noqa: E402

from sparse_adamw import SparseAdamW  # noqa: E402
from sparse_adamw.pipeline.data import eval_blocks, train_blocks  # noqa: E402
from sparse_adamw.pipeline.evaluate import perplexity  # noqa: E402

MODES = {"fp32": (torch.float32, False), "bf16_sr": (torch.bfloat16, True), "bf16_nearest": (torch.bfloat16, False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pruned model directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--eval_windows", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "quality_bf16.csv"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = train_blocks(tokenizer, block_size=args.seq, max_train_samples=args.steps * args.batch)
    if len(train) < args.batch:
        raise SystemExit(f"only {len(train)} training sequences of {args.seq} tokens: lower --batch or --seq")
    windows, split = eval_blocks(tokenizer, block_size=args.seq, max_windows=args.eval_windows)
    env = environment()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    rows = [dict(env, mode="pruned, before", steps=0, lr=args.lr, train_loss="",
                 eval_loss=round(math.log(perplexity(base, windows, 8, progress=False)), 4), seconds="")]
    rows[0]["perplexity"] = round(math.exp(rows[0]["eval_loss"]), 2)
    del base
    for mode in args.modes:
        dtype, stochastic = MODES[mode]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        model.train()
        opt = SparseAdamW(model.parameters(), lr=args.lr, weight_decay=0.0, masks="auto",
                          stochastic_rounding=stochastic, seed=0)
        losses = []
        start = time.time()
        n_batches = len(train) // args.batch
        for i in range(args.steps):
            ids = train[(i % n_batches) * args.batch:(i % n_batches + 1) * args.batch].to(device)  # epochs
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        seconds = time.time() - start
        model.float()
        eval_loss = math.log(perplexity(model, windows, 8, progress=False))
        rows.append(dict(env, mode=mode, steps=args.steps, lr=args.lr,
                         train_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
                         eval_loss=round(eval_loss, 4), perplexity=round(math.exp(eval_loss), 2),
                         seconds=round(seconds, 1)))
        print(f"  {mode}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}", flush=True)
        del model, opt
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    append_csv(args.csv, rows)
    print()
    print(f"{env['gpu']}, torch {env['torch']}; {args.model}; {args.steps} steps of {args.batch} x {args.seq} tokens, "
          f"lr {args.lr}, no weight decay; eval: {len(windows)} windows of {args.seq} tokens of the {split} split, "
          "fp32")
    print(markdown_table(rows, ["mode", "steps", "train_loss", "eval_loss", "perplexity", "seconds"]))


if __name__ == "__main__":
    main()
