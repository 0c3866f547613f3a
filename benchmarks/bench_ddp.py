"""Where the time of one DDP training step goes: forward, backward (with the all-reduce that is not hidden behind
it), clipping and the optimizer step, per rank, against the same work with no communication.

    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --layers 32      # the LLaMA-2-7B shape, DDP on 2 GPUs
    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py --layers 32      # the same step on one GPU (GA doubles)
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --data_parallel sharded   # ShardedSparseAdamW, no DDP

The model is the fine-tune's on a GPU under the 7B plan: bf16 weights and gradients, SparseAdamW with bf16 states,
20% of 16x16 blocks pruned at random, Liger-Kernel where installed, no checkpointing, micro-batch 4 and the
effective batch 8 (GA = 8 / (micro-batch x ranks)), the gradients of DDP's buckets used in place
(gradient_as_bucket_view), clipping by the live blocks' norm as the Trainer does (`--clips fused`:
SparseAdamW.clip_grad_norm_, the step scales as it reads) or as a stock Trainer does (`torch`:
torch.nn.utils.clip_grad_norm_ over every gradient, two passes).

`--data_parallel sharded` replaces DDP by ShardedSparseAdamW (sparse_adamw.sharded_step): each rank steps the
parameters it owns, gradients and weights travel by copy engine; its one variant is `sharded`, whose backward
includes the gradients' copies and whose step includes the weights' (the next forward waits for them per layer); its
clip phase also reports two parts: `wait_peer` (a fence: the peer's backward end and the gradients still on their
way) and `add_landed` (the wait for the adds of the arrived gradients to the owned ones, which run beside the
backward since de173aa; before, the whole add).

Per step, CUDA events on the compute stream time each phase; `ddp` steps all-reduce, `no_comm` steps run the same
micro-steps under no_sync() (nothing is reduced); every variant (and clipping) is interleaved step by step. The
difference of the backward times of `ddp` and `no_comm` is what communication costs the step. `--profile` also
records two `ddp` steps with torch.profiler and reports the NCCL kernels' time, how much of it no compute kernel
overlaps, and how much longer the compute kernels ran than in a `no_comm` step (NCCL's kernels take SMs and memory
bandwidth from the backward); under `--data_parallel sharded` it keeps each rank's trace of two steps in $OUT.
`--allreduce` times all-reduces of the gradients' size alone, in buckets of --bucket_cap_mb. `--blas cublaslt
--sm_carveout N` has cuBLASLt's matmuls leave N SMs to NCCL during the backwards that all-reduce
(torch._C._set_sm_carveout_experimental).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from bench_finetune import apply_liger, build_model  # noqa: E402
from common import environment  # noqa: E402

from sparse_adamw import SparseAdamW  # noqa: E402
from sparse_adamw.pipeline.models import forward_groups, liger_supports  # noqa: E402
from sparse_adamw.sharded_step import ShardedSparseAdamW  # noqa: E402

PHASES = ("forward", "backward", "clip", "step", "total")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--effective_batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data_parallel", choices=("ddp", "sharded"), default="ddp",
                   help="ddp: DDP (variants ddp and no_comm); sharded: ShardedSparseAdamW over copy engines")
    p.add_argument("--bucket_cap_mb", type=float, default=25.0)
    p.add_argument("--no_liger", action="store_true")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--clips", nargs="+", choices=("fused", "torch"), default=["fused"],
                   help="clipping contenders, interleaved: fused = SparseAdamW.clip_grad_norm_, torch = "
                        "torch.nn.utils.clip_grad_norm_")
    p.add_argument("--blas", choices=("default", "cublaslt"), default="default",
                   help="torch.backends.cuda.preferred_blas_library for every matmul")
    p.add_argument("--sm_carveout", type=int, default=0,
                   help="SMs cuBLASLt matmuls leave free during the backwards that all-reduce (0: none)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--allreduce", action="store_true")
    p.add_argument("--json", help="append one line of results (rank 0) to this file")
    p.add_argument("--tag", default="", help="a name for this run in the JSON line")
    return p.parse_args(argv)


class Rank:
    def __init__(self, args):
        self.args = args
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if args.effective_batch % (args.batch * self.world):
            raise SystemExit(f"effective batch {args.effective_batch} is not a multiple of {args.batch} x {self.world}")
        self.ga = args.effective_batch // (args.batch * self.world)
        self.model, masks = build_model("llama7b", args.layers, torch.bfloat16, False, args.sparsity)
        self.liger = not args.no_liger and liger_supports(self.model)
        if self.liger:
            apply_liger(self.model)
        self.sharded = args.data_parallel == "sharded" and self.world > 1
        if self.sharded:
            self.opt = ShardedSparseAdamW(self.model.parameters(), model=self.model,
                                          forward_groups=forward_groups(self.model), lr=1e-5, weight_decay=0.0,
                                          masks=masks, state_dtype=torch.bfloat16)
        else:
            self.opt = SparseAdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0, masks=masks,
                                   state_dtype=torch.bfloat16)
        self.wrapped = self.model
        if self.world > 1 and not self.sharded:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[torch.cuda.current_device()], gradient_as_bucket_view=True,
                bucket_cap_mb=args.bucket_cap_mb)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
        self.times = {}

    def step(self, variant: str, clip: str = "fused", record: bool = True) -> None:
        """One optimizer step: GA micro-steps, clipping, SparseAdamW; `no_comm` reduces nothing."""
        def event():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        forward = backward = 0.0
        start = event()
        marks = []
        for micro in range(self.ga):
            last = micro == self.ga - 1
            sync = variant in ("ddp", "sharded") and last
            if self.sharded:
                self.opt.push_gradients = sync
            context = self.wrapped.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
            with context:
                a = event()
                loss = self.wrapped(input_ids=self.ids, labels=self.ids).loss / self.ga
                b = event()
                carve = sync and self.args.sm_carveout > 0
                if carve:
                    torch._C._set_sm_carveout_experimental(self.args.sm_carveout)
                loss.backward()
                if carve:
                    torch._C._set_sm_carveout_experimental(None)
                c = event()
            marks.append((a, b, c))
        clipped = event()
        if self.sharded:
            # Split the sharded step's gathering out of the clip: an extra fence waits for the peer (its backward's
            # end and the gradients still on their way); the gathering's own fence then passes at once.
            self.opt.transport.wait(self.opt.transport.fence())
            fenced = event()
            self.opt._gather_gradients()
            added = event()
        if clip == "fused":
            self.opt.clip_grad_norm_(self.args.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm, foreach=True)
        stepped = event()
        self.opt.step()
        end = event()
        self.opt.zero_grad(set_to_none=True)  # as the Trainer does
        end.synchronize()
        if not record:
            return
        for a, b, c in marks:
            forward += a.elapsed_time(b)
            backward += b.elapsed_time(c)
        for phase, ms in zip(PHASES, (forward, backward, clipped.elapsed_time(stepped), stepped.elapsed_time(end),
                                      start.elapsed_time(end))):
            self.times.setdefault(f"{variant}/{clip}", {}).setdefault(phase, []).append(ms)
        if self.sharded:  # parts of the clip phase
            for phase, ms in (("wait_peer", clipped.elapsed_time(fenced)), ("add_landed", fenced.elapsed_time(added))):
                self.times[f"{variant}/{clip}"].setdefault(phase, []).append(ms)

    def medians(self):
        return {v: {p: round(statistics.median(ts), 2) for p, ts in phases.items()} for v, phases in self.times.items()}


def allreduce_ms(n_elements: int, bucket_elements: int, reps: int = 5) -> dict:
    """All-reduce n_elements bf16 alone: in one call, and as back-to-back buckets (DDP's pattern)."""
    buf = torch.ones(n_elements, dtype=torch.bfloat16, device="cuda")
    out = {}
    for name, chunk in (("one_call", n_elements), ("buckets", bucket_elements)):
        times = []
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            for i in range(0, n_elements, chunk):
                dist.all_reduce(buf[i:i + chunk])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times[1:])
        # bus bandwidth as nccl-tests count it: 2 (n-1)/n of the bytes, each way
        world = dist.get_world_size()
        out[name] = dict(ms=round(ms, 2), bus_gbs=round(2 * (world - 1) / world * n_elements * 2 / ms / 1e6, 1))
    del buf
    torch.cuda.empty_cache()
    return out


def kernel_overlap(trace_path: str) -> dict:
    """From a chrome trace: NCCL kernel time, the part of it no compute kernel overlaps, and compute and matmul kernel
    time."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    nccl = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower())
    compute = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower())

    def union(intervals):
        merged = []
        for s, e in intervals:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return merged

    busy = union(compute)
    exposed = 0.0
    j = 0
    for s, e in union(nccl):
        covered = 0.0
        while j < len(busy) and busy[j][1] < s:
            j += 1
        k = j
        while k < len(busy) and busy[k][0] < e:
            covered += min(e, busy[k][1]) - max(s, busy[k][0])
            k += 1
        exposed += (e - s) - covered
    # cuBLAS's matmuls (nvjet_* on Hopper): persistent kernels with one CTA per SM, so they wait for SMs that NCCL holds
    gemm = sum(e["dur"] for e in kernels if e["name"].startswith("nvjet") or "gemm" in e["name"].lower())
    return dict(nccl_ms=round(sum(e - s for s, e in nccl) / 1e3, 1), nccl_exposed_ms=round(exposed / 1e3, 1),
                compute_kernel_ms=round(sum(e - s for s, e in compute) / 1e3, 1), gemm_kernel_ms=round(gemm / 1e3, 1),
                nccl_kernels=len(nccl))


def gzip_into_out(path: str, name: str) -> None:
    """Keep a profiler trace: gzipped into $OUT (the device tool's folder of results), if set."""
    out = os.environ.get("OUT")
    if out:
        with open(path, "rb") as src, gzip.open(os.path.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst)


def main(argv=None):
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.data_parallel == "sharded" and "torch" in args.clips:
        raise SystemExit("--clips torch needs every gradient on every rank; ShardedSparseAdamW keeps each on its owner")
    r = Rank(args)
    comms = ("single",) if r.world == 1 else ("sharded",) if r.sharded else ("ddp", "no_comm")
    variants = [(comm, clip) for comm in comms for clip in args.clips]
    for _ in range(args.warmup):
        for v in variants:
            r.step(*v, record=False)
    for _ in range(args.steps):
        for v in variants:
            r.step(*v)
    result = dict(tag=args.tag, world=r.world, data_parallel=args.data_parallel, batch=args.batch, ga=r.ga,
                  layers=args.layers, liger=r.liger,
                  bucket_cap_mb=args.bucket_cap_mb, blas=args.blas, sm_carveout=args.sm_carveout,
                  medians=r.medians(),
                  nccl_env={k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL"))},
                  **environment())
    result["tokens_per_s"] = {name: round(args.effective_batch * args.seq / m["total"] * 1e3)
                              for name, m in result["medians"].items()}
    if args.profile and r.sharded:  # each rank's trace of two steps: what the clip phase waits for
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r.step("sharded", args.clips[0], record=False)
            r.step("sharded", args.clips[0], record=False)
        trace = f"/tmp/bench_sharded_trace_rank{rank}.json"
        prof.export_chrome_trace(trace)
        gzip_into_out(trace, f"bench_sharded_trace_{args.tag}_rank{rank}.json.gz")
    if args.profile and r.world > 1 and not r.sharded:
        from torch.profiler import ProfilerActivity, profile

        trace = f"/tmp/bench_ddp_trace_rank{rank}.json"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r.step("ddp", args.clips[0], record=False)
            r.step("ddp", args.clips[0], record=False)
        prof.export_chrome_trace(trace)
        result["profile_2_ddp_steps"] = kernel_overlap(trace)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r.step("no_comm", args.clips[0], record=False)
            r.step("no_comm", args.clips[0], record=False)
        prof.export_chrome_trace(trace + ".nocomm")
        result["profile_2_no_comm_steps"] = kernel_overlap(trace + ".nocomm")
        if rank == 0:
            for path, name in ((trace, "ddp"), (trace + ".nocomm", "no_comm")):
                gzip_into_out(path, f"bench_ddp_trace_{args.tag}_{name}.json.gz")
    if args.allreduce and r.world > 1:
        n = sum(p.numel() for p in r.model.parameters())
        result["allreduce_alone"] = allreduce_ms(n, int(args.bucket_cap_mb * 2**20 / 2))
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if r.sharded:  # the ranks' own phases: how long each waits for the other
        print(f"rank {rank}: {json.dumps(r.medians())}", flush=True)
    if rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
