"""Plain LoRA, as a pruned model is fine-tuned with PEFT today: the baseline row of the masked LoRA comparison.

The pruned model, frozen, with PEFT's LoRA adapters (unmasked) on every decoder Linear, trained with a Hugging Face
Trainer on the LM loss over the same training blocks and schedule as the fine-tune (3 epochs of 1024-token
sequences, effective batch 8, linear decay). Prints one JSON line: perplexity before, with the adapters (unmerged)
and after PEFT's merge; the merged model's exact zeros and how many of the pruned blocks are still all zero; the
training time and the GPU's peak. The merge adds B·A everywhere, so the pruned blocks fill in; masked LoRA
(`python -m sparse_adamw.pipeline.finetune --lora`) keeps them.

    python benchmarks/plain_lora.py --model out/smollm2-135m/block_16x16_20sparsity/wanda/pruned_model \
        --output_dir /tmp/plain_lora [--r 16 --alpha 32 --learning_rate 2e-4 --max_steps N]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sparse_adamw.masks import MASKS_FILE, leaked_blocks, load_masks  # noqa: E402
from sparse_adamw.pipeline.data import DEFAULT_DATASET, load_eval_windows, train_blocks  # noqa: E402
from sparse_adamw.pipeline.evaluate import perplexity  # noqa: E402
from sparse_adamw.pipeline.lora import ALL_LINEAR  # noqa: E402
from sparse_adamw.pipeline.models import load_model  # noqa: E402
from sparse_adamw.sparsity import check_sparsity  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def pruned_blocks_kept(model, masks, block) -> float:
    """The share of the masks' pruned blocks that are still all zero in `model`."""
    params = dict(model.named_parameters())
    pruned = kept = 0
    for name, mask in masks.items():
        leaked = leaked_blocks(params[name].detach(), mask.to(params[name].device), block)
        pruned += int((~mask).sum())
        kept += int((~mask).sum()) - int(leaked.sum())
    return kept / max(pruned, 1)


def main(argv=None) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the pruned model's folder (with block_masks.pt)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset", default=None, help=f"default {DEFAULT_DATASET}, or --dataset_path FILE")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--max_eval_windows", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--effective_batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, tokenizer = load_model(args.model, "cpu", "bfloat16" if cuda else "float32")
    masks, block = load_masks(Path(args.model) / MASKS_FILE)
    dataset = args.dataset or (None if args.dataset_path else DEFAULT_DATASET)
    train = train_blocks(tokenizer, dataset, args.dataset_path, args.block_size)
    windows, evaluated = load_eval_windows(tokenizer, dataset, args.dataset_path, args.block_size,
                                           args.max_eval_windows)
    model.to(device)
    result = {"model": args.model, "evaluated": evaluated, "r": args.r, "alpha": args.alpha,
              "learning_rate": args.learning_rate, "perplexity": {}}
    result["perplexity"]["before"] = perplexity(model, windows, 4, device, progress=False)

    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
    micro = min(args.micro_batch, args.effective_batch)
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.effective_batch // micro, learning_rate=args.learning_rate,
        num_train_epochs=args.epochs, max_steps=args.max_steps, bf16=cuda, use_cpu=not cuda, logging_steps=10,
        save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True, weight_decay=0.0)
    trainer = Trainer(model=model, args=training, train_dataset=Blocks(train), data_collator=default_data_collator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    result["train_s"] = round(time.perf_counter() - start, 1)
    result["steps"], result["train_loss"] = output.global_step, output.training_loss
    result["peak_memory_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None
    model.eval()
    result["perplexity"]["adapted"] = perplexity(model, windows, 4, device, progress=False)
    merged = model.merge_and_unload()
    result["perplexity"]["merged"] = perplexity(merged, windows, 4, device, progress=False)
    result["sparsity"] = {"merged": check_sparsity(merged, verbose=False)}
    result["pruned_blocks_still_zero"] = pruned_blocks_kept(merged, masks, block)
    ppl = result["perplexity"]
    result["merge_changed_perplexity_by"] = ppl["merged"] / ppl["adapted"] - 1 if math.isfinite(ppl["merged"]) else None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
