"""Save a random-init LlamaForCausalLM with LLaMA-7B dims (the number of layers is yours) and 20% of the 16x16
blocks of its decoder Linears pruned, with a tokenizer: a stand-in for the pruned LLaMA-2-7B in speed and memory
runs (multi-GPU fine-tunes), where only the shapes matter. `--sparsity 0` saves it dense, for the prune command
(benchmarks/rehearse_7b.sh); `--hidden_size` and the like shrink it for a trial on the CPU.

    python benchmarks/make_random_llama.py --layers 4 --tokenizer DIR --output_dir /tmp/llama7b_4layers
    python benchmarks/make_random_llama.py --layers 32 --tokenizer words:32000 --output_dir /tmp/llama7b

`--tokenizer words:N` needs no files: a word-level tokenizer over the N most frequent words of the offline corpus
(LLaMA-2's vocabulary is 32000), so the model has LLaMA-7B's exact shape and trains on real text.
"""
import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common import prune_randomly


def word_tokenizer(size: int):
    """A WordLevel tokenizer over the size - 3 most frequent words of the offline corpus, plus unk/bos/eos."""
    import collections

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparse_adamw.pipeline.data import load_text_splits

    counts = collections.Counter(w for text in load_text_splits()["train"] for w in text.split())
    words = [w for w, _ in counts.most_common(size - 3)]
    vocab = {t: i for i, t in enumerate(["[UNK]", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory; its vocabulary sizes the model")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hidden_size", type=int, default=4096)
    parser.add_argument("--intermediate_size", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args()

    if args.tokenizer.startswith("words:"):
        tokenizer = word_tokenizer(int(args.tokenizer.split(":", 1)[1]))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         vocab_size=len(tokenizer),
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype))
    if args.sparsity > 0:
        prune_randomly(model, args.sparsity)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()):,} params to {args.output_dir}")


if __name__ == "__main__":
    main()
