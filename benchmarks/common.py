"""Shared by the benchmark scripts: timing, copy bandwidth, LLaMA-7B shapes, environment and CSV rows."""
from __future__ import annotations

import csv
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
from typing import Callable, Dict, List, Optional

import torch

# One LLaMA-7B decoder layer's Linear weights: q, k, v, o, gate, up, down.
LLAMA7B_LAYER_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def median_ms(fn: Callable[[], None], warmup: int = 3, reps: int = 20, device_only: bool = False) -> float:
    """Median of CUDA-event timings of `fn`, in ms.

    By default the GPU is idle when `fn` starts, so its host time (Python, launches) counts. With `device_only`,
    a sleep kernel queued first keeps the GPU busy while the host issues `fn`'s work, as the backward pass does
    in training: the events then time the device work alone.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if device_only:
            torch.cuda._sleep(20_000_000)  # about 10 ms, longer than any step's host time
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(n_bytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=30)
    del src, dst
    return 2 * n_bytes / ms / 1e6


# CUDA's context limit on how many bytes L2 fetches from DRAM per miss (a hint, 0 to 128; 64 on the H100). A
# 32-byte bf16 block row whose neighbour is pruned wastes the other half of a 64-byte fetch.
CU_LIMIT_MAX_L2_FETCH_GRANULARITY = 5


def l2_fetch_granularity(n_bytes: Optional[int] = None) -> int:
    """The current context's L2 fetch granularity in bytes; with `n_bytes`, set it first (every kernel after)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    torch.cuda.init()
    torch.cuda.synchronize()
    if n_bytes is not None and cuda.cuCtxSetLimit(CU_LIMIT_MAX_L2_FETCH_GRANULARITY, ctypes.c_size_t(n_bytes)):
        raise RuntimeError(f"cuCtxSetLimit(CU_LIMIT_MAX_L2_FETCH_GRANULARITY, {n_bytes}) failed")
    value = ctypes.c_size_t()
    if cuda.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_MAX_L2_FETCH_GRANULARITY):
        raise RuntimeError("cuCtxGetLimit(CU_LIMIT_MAX_L2_FETCH_GRANULARITY) failed")
    return value.value


def git_sha() -> str:
    """The commit measured. The device machine's copy of the tree has no .git, or a stale one: the caller passes the
    SHA there in SPARSE_ADAMW_GIT_SHA."""
    sha = os.environ.get("SPARSE_ADAMW_GIT_SHA", "")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(__file__)).stdout.strip()
        except OSError:
            pass
    return sha or "unknown"


def host_cpu() -> str:
    """The host's processor and core count: host-bound work (a micro-batch of 1, per-weight host loops) moves with it,
    so rows from different machines are compared with it in view."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} x {os.cpu_count()}"


def environment() -> Dict[str, str]:
    import triton

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "host_cpu": host_cpu(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": git_sha(),
    }


def append_csv(path: str, rows: List[Dict]) -> None:
    """Append rows. An existing file keeps its column order; columns the rows add are appended to its header
    (earlier rows leave them empty)."""
    if not rows:
        return
    fields = list(rows[0])
    old_rows = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            existing = list(reader.fieldnames or [])
            if not set(existing) <= set(fields):
                raise ValueError(f"{path} has columns {existing}, these rows {fields}: write them to another --csv")
            if set(fields) - set(existing):
                old_rows = list(reader)  # the header grows: rewrite the file
        fields = existing + [c for c in fields if c not in existing]
    new = old_rows is not None or not os.path.exists(path)
    with open(path, "w" if old_rows is not None else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows((old_rows or []) + rows)


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


@torch.no_grad()
def prune_randomly(model, sparsity: float, seed: int = 0) -> Dict[torch.Tensor, torch.Tensor]:
    """Zero a random `sparsity` of the 16x16 blocks of every decoder Linear weight; {weight: its block mask}."""
    from sparse_adamw import apply_block_mask_, random_block_mask
    from sparse_adamw.sparsity import decoder_layers, find_linears

    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in decoder_layers(model):
        for module in find_linears(layer).values():
            mask = random_block_mask(module.weight.shape, sparsity, generator=gen, device=module.weight.device)
            apply_block_mask_(module.weight, mask)
            masks[module.weight] = mask
    return masks
