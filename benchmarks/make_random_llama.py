"""Save a random-init LlamaForCausalLM with LLaMA-7B dims (the number of layers is yours) and 20% of the 16x16
blocks of its decoder Linears pruned, with a tokenizer: a stand-in for the pruned LLaMA-2-7B in speed and memory
runs (multi-GPU fine-tunes), where only the shapes matter.

    python benchmarks/make_random_llama.py --layers 4 --tokenizer DIR --output_dir /tmp/llama7b_4layers
"""
import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common import prune_randomly


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory; its vocabulary sizes the model")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype))
    prune_randomly(model, args.sparsity)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()):,} params to {args.output_dir}")


if __name__ == "__main__":
    main()
