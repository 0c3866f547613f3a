"""Perplexity and wall time of dense, block-Wanda and block-magnitude SmolLM2-135M.

The setup of docs/design.md, "The offline default".

    python benchmarks/bench_prune_cpu.py [--nsamples 32 128] [--sparsity 0.2]

One process: the packaged model is loaded once and deep-copied for each method. fp32, the validation split of
the offline corpus, the first 16 windows of 256 tokens (the CPU defaults of sparse_adamw.pipeline.evaluate). Appends
rows to benchmarks/results/prune_cpu.csv and prints a markdown table last. `*_cpu_s` is process CPU time (all
threads): on a shared machine it moves less than wall time does.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_csv, environment, markdown_table  # noqa: E402

from sparse_adamw.pipeline.data import load_eval_windows, train_blocks  # noqa: E402
from sparse_adamw.pipeline.cli import CPU_BLOCK_SIZE, CPU_MAX_EVAL_WINDOWS  # noqa: E402
from sparse_adamw.pipeline.evaluate import perplexity  # noqa: E402
from sparse_adamw.pipeline.models import DEFAULT_MODEL, load_model  # noqa: E402
from sparse_adamw.pipeline.prune import CPU_NSAMPLES, calibration_blocks, prune_model  # noqa: E402
from sparse_adamw.sparsity import check_sparsity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, nargs="+", default=[CPU_NSAMPLES], help="Wanda calibration sizes")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "prune_cpu.csv"))
    args = parser.parse_args()

    start = time.perf_counter()
    dense, tokenizer = load_model(DEFAULT_MODEL, "cpu", torch.float32)
    load_s = time.perf_counter() - start
    windows, what = load_eval_windows(tokenizer, None, None, CPU_BLOCK_SIZE, CPU_MAX_EVAL_WINDOWS)
    print(f"loaded {DEFAULT_MODEL} in {load_s:.1f} s; evaluating {what}; torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    train = train_blocks(tokenizer, block_size=CPU_BLOCK_SIZE)
    tokenize_s = time.perf_counter() - start

    env = {**environment(), "card": f"CPU, {os.cpu_count()} cores"}
    rows = []

    def record(method, nsamples, model, prune_s, prune_cpu_s):
        start, start_cpu = time.perf_counter(), time.process_time()
        ppl = perplexity(model, windows, batch_size=4, progress=False)
        eval_s, eval_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        rows.append({
            **env, "method": method, "nsamples": nsamples, "sparsity": round(check_sparsity(model, False), 6),
            "perplexity": round(ppl, 2), "prune_s": round(prune_s, 1), "eval_s": round(eval_s, 1),
            "prune_cpu_s": round(prune_cpu_s, 1), "eval_cpu_s": round(eval_cpu_s, 1),
            "load_s": round(load_s, 1), "tokenize_train_s": round(tokenize_s, 1),
        })
        print(rows[-1])

    record("dense", 0, dense, 0.0, 0.0)
    runs = [("wanda", n) for n in args.nsamples] + [("magnitude", 0)]
    for method, nsamples in runs:
        model = copy.deepcopy(dense)
        calibration = calibration_blocks(train, nsamples, seed=0) if method == "wanda" else None
        start, start_cpu = time.perf_counter(), time.process_time()
        prune_model(model, method, args.sparsity, 16, calibration, batch_size=4, progress=False)
        record(method, nsamples, model, time.perf_counter() - start, time.process_time() - start_cpu)
        del model

    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    append_csv(args.csv, rows)
    columns = ["card", "method", "nsamples", "sparsity", "perplexity", "prune_s", "eval_s", "prune_cpu_s", "eval_cpu_s"]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
