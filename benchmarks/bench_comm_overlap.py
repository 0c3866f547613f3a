"""Does exchanging gradients slow the backward's matmuls? NCCL's all-reduce against copy-engine pushes, 2 GPUs.

Under DDP on 2 GPUs the 7B backward runs 27 ms longer than without communication, mostly because NCCL's kernels
hold SMs that cuBLAS's persistent matmuls wait for (benchmarks/RESULTS.md). A copy engine moves bytes between
GPUs without SMs; only the sum would need them. This bench measures that alone, outside any model: each rank runs
the matmuls of a LLaMA-7B-shaped backward (dgrad and wgrad of every Linear, bf16, writing the weight gradients into
one flat buffer) while a second stream exchanges each layer's gradients as they are written:

  none     nothing (the matmuls alone)
  nccl     dist.all_reduce of each chunk (what DDP does, in its 25 MB buckets)
  ce       each rank copies each chunk into a buffer on the other GPU (cudaMemcpy over NVLink into symmetric memory;
           --transport ipc: legacy CUDA IPC instead): no sum
  ce_add   ce, then each layer's gradients += what arrived (the sum an all-reduce needs, on SMs)
  ce_rs    an all-reduce by copy engine in halves: each rank pushes the half of a layer's gradients the other
           sums, sums its own half (half of ce_add's reads and writes), and pushes that half back
  nccl_alone, ce_alone, ce_rs_alone: the communication without the matmuls (its own time)

Timing only: the pushes are not ordered against the peer's reads, so ce_add adds whatever is there. Modes
alternate within each round; medians over rounds. Needs 2 GPUs with peer access.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_comm_overlap.py --json out.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

MODES = ("none", "nccl", "ce", "ce_add", "ce_rs", "nccl_alone", "ce_alone", "ce_rs_alone")


def landing_space(numel, dev, transport):
    """A bf16 buffer on this GPU, and the other rank's, as a tensor this process can copy into.

    Symmetric memory maps the peer's buffer into this GPU's address space, so a copy into it is a same-device
    cudaMemcpyAsync that a copy engine carries over NVLink. Legacy CUDA IPC opens it as a tensor on the peer's
    device, and torch's cross-device copy then synchronises the two devices' streams around every copy."""
    rank = dist.get_rank()
    if transport == "symm":
        import torch.distributed._symmetric_memory as symm_mem

        recv = symm_mem.empty(numel, dtype=torch.bfloat16, device=dev)
        handle = symm_mem.rendezvous(recv, dist.group.WORLD)
        return recv, handle.get_buffer(1 - rank, (numel,), torch.bfloat16), "symmetric memory"
    recv = torch.zeros(numel, device=dev, dtype=torch.bfloat16)
    handles = [None] * dist.get_world_size()
    dist.all_gather_object(handles, reduce_tensor(recv))
    rebuild, rebuild_args = handles[1 - rank]
    return recv, rebuild(*rebuild_args), "CUDA IPC"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=4096, help="micro-batch x sequence length")
    parser.add_argument("--chunk_mb", type=float, default=25.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--transport", default="symm", choices=["symm", "ipc"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit("bench_comm_overlap.py runs on exactly 2 GPUs")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    bf16 = torch.bfloat16
    h, i, t = args.hidden, args.intermediate, args.tokens
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]  # q, k, v, o, gate, up, down: (out, in)
    weights = [torch.randn(s, device=dev, dtype=bf16) * 0.02 for s in shapes]
    inputs = {n: torch.randn(t, n, device=dev, dtype=bf16) for n in (h, i)}
    douts = {n: torch.randn(t, n, device=dev, dtype=bf16) for n in (h, i)}
    per_layer = sum(a * b for a, b in shapes)
    grads = torch.zeros(args.layers * per_layer, device=dev, dtype=bf16)
    chunk = max(1, int(args.chunk_mb * 2**20) // 2)
    recv, peer_recv, transport = landing_space(2 * per_layer, dev, args.transport)  # two layers' worth
    side = torch.cuda.Stream(dev)
    if rank == 0:
        print(f"peer buffer through {transport}", flush=True)

    def push(flat, begin, n, dest):
        """flat[begin:begin + n] into the peer's buffer at dest, in chunks."""
        for offset in range(0, n, chunk):
            k = min(chunk, n - offset)
            source = flat[begin + offset:begin + offset + k]
            peer_recv[dest + offset:dest + offset + k].copy_(source, non_blocking=True)

    def layer_grads(layer):
        return grads[layer * per_layer:(layer + 1) * per_layer]

    def backward(mode):
        main = torch.cuda.current_stream(dev)
        start, matmuls_done, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record(main)
        comm = mode.removesuffix("_alone")
        for layer in reversed(range(args.layers)):
            flat, offset = layer_grads(layer), 0
            for w in reversed(weights if comm == mode else []):
                out_f, in_f = w.shape
                torch.mm(douts[out_f], w)  # dgrad
                torch.mm(douts[out_f].t(), inputs[in_f], out=flat[offset:offset + w.numel()].view(out_f, in_f))
                offset += w.numel()
            if comm == "none":
                continue
            ready = torch.cuda.Event()
            ready.record(main)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                slot = (layer % 2) * per_layer
                if comm == "ce_rs":  # rank r sums half r
                    half = per_layer // 2
                    mine, theirs = (rank * half, (1 - rank) * half)
                    push(flat, theirs, half, slot + theirs)
                    flat[mine:mine + half].add_(recv[slot + mine:slot + mine + half])
                    push(flat, mine, half, slot + mine)
                    continue
                if comm == "nccl":
                    for begin in range(0, per_layer, chunk):
                        dist.all_reduce(flat[begin:begin + chunk])
                else:
                    push(flat, 0, per_layer, slot)
                if comm == "ce_add":
                    flat.add_(recv[slot:slot + per_layer])
        matmuls_done.record(main)
        main.wait_stream(side)
        end.record(main)
        torch.cuda.synchronize(dev)
        return start.elapsed_time(matmuls_done), start.elapsed_time(end)

    flops = 2 * 2 * t * per_layer * args.layers  # dgrad and wgrad
    results = {m: [] for m in args.modes}
    for r in range(args.rounds + 1):
        for mode in args.modes:
            dist.barrier(device_ids=[dev.index])
            torch.cuda.synchronize(dev)
            timing = backward(mode)
            if r:  # round 0 warms up
                results[mode].append(timing)
    if rank == 0:
        base = statistics.median(x[0] for x in results.get("none", [])) if "none" in results else None
        for mode, times in results.items():
            mm, total = statistics.median(x[0] for x in times), statistics.median(x[1] for x in times)
            row = {"mode": mode, "matmul_ms": round(mm, 2), "total_ms": round(total, 2), "rounds": len(times),
                   "grad_gb": round(grads.numel() * 2 / 1e9, 2), "chunk_mb": args.chunk_mb, "transport": transport}
            if not mode.endswith("_alone"):  # the _alone modes run no matmuls
                row["matmul_tflops"] = round(flops / mm / 1e9, 1)
                if base:
                    row["matmul_ms_over_none"] = round(mm - base, 2)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    dist.barrier(device_ids=[dev.index])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
