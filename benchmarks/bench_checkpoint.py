"""What a checkpoint costs training at the LLaMA-2-7B shape, with the disk out of the way.

SparseTrainer trains a random-init LLaMA-7B-shaped model (20% of its decoder Linears' 16x16 blocks pruned, bf16
weights and states, micro-batch 4 x accumulation 2 without recomputation: the 80 GB plan without a teacher) and
checkpoints every --save_steps steps, as the fine-tune does: a snapshot into page-locked host buffers, then a writer
thread. Here the writer's two large files go to /dev/null, so what is measured is the snapshot and the writer's
interference, not the disk (benchmarks/rehearse_7b.sh measures a real disk, at the depth it can hold).

Per checkpoint: how long training paused for the snapshot, and the training time lost over the steps that follow
it (each step's time against the median step without a checkpoint in flight). Also how long the first allocation
and page-locking of the host buffers took (on a thread, during the first steps).

    python benchmarks/bench_checkpoint.py --layers 32 --steps 24 --save_steps 6
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import prune_randomly  # noqa: E402

from sparse_adamw.pipeline import checkpoints  # noqa: E402
from sparse_adamw.pipeline.trainer import SparseTrainer  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepEnds(TrainerCallback):
    """The wall time each optimizer step ended, the GPU done with it (a synchronize per step, as the loss log does)."""

    def __init__(self):
        self.ends = {}

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends[state.global_step] = time.perf_counter()


def _to_null(path, tensors, metadata=None):
    """save_safetensors to /dev/null: the bytes go through write() as they would to a file."""
    with open(os.devnull, "wb") as f:
        for t in tensors.values():
            if t.numel():
                f.write(checkpoints._as_bytes(t))
    open(path, "wb").close()  # the folder still holds the file, empty
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _torch_to_null(obj, path):
    with open(os.devnull, "wb") as f:
        torch.save(obj, f)
    open(path, "wb").close()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=4096)
    parser.add_argument("--intermediate_size", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--save_steps", type=int, default=6)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    prune_randomly(model, 0.2)
    model.config.use_cache = False
    checkpoints.save_safetensors = _to_null
    checkpoints._save_torch = _torch_to_null
    reserve = checkpoints.HostCopies.reserve

    def timed_reserve(self, *a, **k):
        start = time.perf_counter()
        reserve(self, *a, **k)
        timed_reserve.seconds = time.perf_counter() - start

    timed_reserve.seconds = None
    checkpoints.HostCopies.reserve = timed_reserve
    ends = StepEnds()
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.accumulation, max_steps=args.steps, save_steps=args.save_steps,
            save_total_limit=1, bf16=cuda, use_cpu=not cuda, report_to="none", disable_tqdm=True, logging_steps=1,
            learning_rate=5e-5, dataloader_pin_memory=cuda, logging_nan_inf_filter=False)
        trainer = SparseTrainer(model=model, args=training, callbacks=[ends], checkpoint_at_end=False,
                                state_dtype=dtype, train_dataset=RandomTokens(
                                    args.steps * args.micro_batch * args.accumulation, args.seq, args.vocab))
        trainer.train()
    steps = sorted(ends.ends)
    dt = {s: ends.ends[s] - ends.ends[prev] for prev, s in zip(steps, steps[1:])}
    saved = [r.step for r in trainer.checkpoint_writer.records]
    quiet = [t for s, t in dt.items() if s > 4 and all(not (c < s <= c + 2) for c in saved)]
    median = statistics.median(quiet) if quiet else statistics.median(dt.values())
    rows = []
    for record in trainer.checkpoint_writer.records:
        after = [dt[s] for s in range(record.step + 1, record.step + args.save_steps) if s in dt]
        rows.append({"step": record.step, "paused_s": round(record.stall_s, 3),
                     "lost_s": round(sum(t - median for t in after), 3), "steps_after": len(after),
                     "write_s": None if record.write_s is None else round(record.write_s, 2),
                     "snapshot_gb": round(trainer.snapshots.copies.nbytes / 1e9, 2), "error": record.error})
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "layers": args.layers,
              "params": sum(p.numel() for p in model.parameters()), "median_step_s": round(median, 4),
              "tokens_per_s": round(args.micro_batch * args.accumulation * args.seq / median),
              "host_buffers_reserve_s": timed_reserve.seconds,
              "peak_memory_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if cuda else None,
              "checkpoints": rows}
    print(json.dumps(result, indent=1))
    print("\n| checkpoint step | training paused (s) | training lost over the next steps (s) | write to /dev/null (s) |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['paused_s']:.2f} | {row['lost_s']:.2f} | {row['write_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
