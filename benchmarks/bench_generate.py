"""How fast the teacher writes its share of the training text (teacher_text.py), on one GPU.

Random-init models of the packaged SmolLM2-135M's shape and of LLaMA-2-7B's (bf16; speed does not depend on the
weights), prompts of 16 random tokens continued to 1024 tokens, as the fine-tune does it (teacher_text.generate:
static KV cache, equal batches, the batch sized from the free memory), with each decoder of --decoders: `ours`,
teacher_text.decode (the fine-tune's: a loop of the model's forwards, attention over the written positions only,
sampling over the top k); `ours_cudnn`, the same with cuDNN's attention allowed first (as PyTorch prefers it on
Hopper: each decoding step has a new key length, and so a new cuDNN graph); `generate`, transformers' generate,
eager. (Its compiled step, CUDA graphs, was measured once and dropped: 105 s for 1M tokens on an H100, compilation
included; RESULTS.md.)

    python benchmarks/bench_generate.py --json results.json
    python benchmarks/bench_generate.py --sizes 135m --tokens 1000000 --decoders ours,generate
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_adamw.pipeline import teacher_text  # noqa: E402

SHAPES = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
}


def model_of(shape: str) -> LlamaForCausalLM:
    config = LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = 2
    return model.eval()


def measure(model, n: int, length: int, prompt: int) -> dict:
    free, _ = torch.cuda.mem_get_info()
    batch = teacher_text.batch_for(model.config, length, 2, free, n)
    prompts = torch.randint(model.config.vocab_size, (n, prompt), generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    made = teacher_text.generate(model, prompts, length, teacher_text.TextSettings(1.0), 0, batch=batch,
                                 say=lambda line: print(line, flush=True))
    tokens = n * (length - prompt)
    return {"sequences": n, "tokens": tokens, "batch": made["batch"], "seconds": round(made["seconds"], 2),
            "tokens_per_s": round(tokens / made["seconds"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,7b")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens to write at the 135M shape")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--batches_7b", type=int, default=1, help="batches to write at the 7B shape")
    parser.add_argument("--decoders", default="ours,generate",
                        help="comma-separated: ours (teacher_text.decode), ours_cudnn (decode with cuDNN attention "
                        "allowed), generate (transformers', eager)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "runs": []}
    backends = teacher_text.DECODING_BACKENDS
    for shape in args.sizes.split(","):
        model = model_of(shape)
        free, _ = torch.cuda.mem_get_info()
        if shape == "135m":
            n = -(-args.tokens // (args.length - args.prompt))
        else:
            n = args.batches_7b * teacher_text.batch_for(model.config, args.length, 2, free, 10**6)
        for decoder in args.decoders.split(","):
            teacher_text.OWN_DECODING = decoder.startswith("ours")
            teacher_text.DECODING_BACKENDS = ("CUDNN_ATTENTION",) + backends if decoder == "ours_cudnn" else backends
            started = time.perf_counter()
            run = {"shape": shape, "decoder": decoder, **measure(model, n, args.length, args.prompt)}
            run["wall_s"] = round(time.perf_counter() - started, 2)
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
        teacher_text.OWN_DECODING, teacher_text.DECODING_BACKENDS = True, backends
        del model
        torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
