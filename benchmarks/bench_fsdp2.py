"""FSDP2 (fully_shard) with SparseAdamW: peak memory per GPU and step time for a LLaMA-2-7B-shaped model.

Random init (only shapes matter), 20% of the decoder Linears' 16x16 blocks pruned, bf16 params and grads,
gradient checkpointing, seq 1024, batch 1 per GPU. Every decoder layer and the root are fully_shard-ed, so
each GPU holds 1/N of the params, grads and (compact) optimizer state. Run with torchrun:

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2.py --layers 32
"""
import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import environment  # noqa: E402

from sparse_adamw import SparseAdamW, random_block_mask  # noqa: E402
from sparse_adamw.masks import expand_block_mask  # noqa: E402
from sparse_adamw.dtensor import row_offset  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--state_dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()

    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cuda")

    # Init and prune shard by shard: the masks are global, each rank zeroes the rows it holds.
    gen = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p._local_tensor
            local.normal_(0, 0.02) if p.dim() == 2 else local.fill_(1.0)
            if ".layers." in name and p.dim() == 2:
                mask = random_block_mask(p.shape, 0.2, generator=gen, device="cuda")
                start = row_offset(p, name)
                local.mul_(expand_block_mask(mask, p.shape)[start:start + local.shape[0]].to(local.dtype))
                masks[p] = mask
    opt = SparseAdamW(model.parameters(), lr=5e-5, weight_decay=0.0, masks=masks,
                      state_dtype=torch.bfloat16 if args.state_dtype == "bf16" else torch.float32)
    tokens = torch.randint(0, 32000, (1, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(rank))
    torch.cuda.reset_peak_memory_stats()
    step_ms, opt_ms = [], []
    for it in range(args.steps + 2):
        a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        a.record()
        model(input_ids=tokens, labels=tokens).loss.backward()
        b.record()
        opt.step()
        c.record()  # optimizer.step() alone: zero_grad is not the optimizer's work
        opt.zero_grad()
        c.synchronize()
        if it >= 2:
            step_ms.append(a.elapsed_time(c))
            opt_ms.append(b.elapsed_time(c))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    # Pruned blocks still zero on every shard.
    bad = torch.zeros(1, device="cuda")
    for p, mask in masks.items():
        start = row_offset(p, "")
        pruned = ~expand_block_mask(mask, p.shape)[start:start + p._local_tensor.shape[0]]
        bad += (p._local_tensor[pruned] != 0).sum()
    dist.all_reduce(bad)
    if rank == 0:
        env = environment()
        n = sum(p.numel() for p in model.parameters())
        print(f"{env['gpu']} x{world}, torch {env['torch']}, triton {env['triton']}; {n:,} params "
              f"({args.layers} layers), bf16 params, {args.state_dtype} states, grad ckpt, seq 1024, batch 1/GPU")
        print(f"| GPUs | peak GiB per GPU (max) | step ms | optimizer.step() ms | state GiB per GPU | nonzeros in "
              f"pruned blocks |\n|---|---|---|---|---|---|\n| {world} | {peak.item():.2f} | "
              f"{statistics.median(step_ms):.1f} | {statistics.median(opt_ms):.1f} | "
              f"{opt.state_bytes() / 2**30:.2f} | {int(bad.item())} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
