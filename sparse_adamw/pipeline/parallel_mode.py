"""How the fine-tune splits its work over several processes: DDP, the sharded step (ShardedSparseAdamW) or FSDP2,
and the facts about the host that the choice rests on (which GPUs reach each other's memory, NVLink)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

MODES = ("auto", "ddp", "sharded")
SHARDED_MEASURED_GPUS = 2  # the sharded step's speed is measured on this many GPUs (benchmarks/RESULTS.md)


def resolve_fsdp(training: Dict[str, object], on_cpu: bool, world_size: int) -> None:
    """Check --fsdp and pin its config to FSDP2, in place; ValueError where it cannot run."""
    if on_cpu:
        raise ValueError("--fsdp needs GPUs: accelerate runs FSDP on accelerators only (on the CPU it would "
                         "quietly train with DDP instead)")
    if world_size < 2:
        raise ValueError("--fsdp shards over several processes: launch it with torchrun "
                         "(run_dense_finetune.sh --num_gpus 2 or more)")
    config = training.get("fsdp_config") or {}
    if isinstance(config, dict):
        version = int(config.get("version", config.get("fsdp_version", 2)))
        if version != 2:
            raise ValueError(f"--fsdp_config asks for FSDP{version}: SparseAdamW needs FSDP2 (version 2), which "
                             "keeps each parameter's rows together")
        training["fsdp_config"] = {**config, "version": 2}
    training["fsdp"] = True


def choose(asked: str, *, fsdp: bool, on_cpu: bool, world_size: int) -> Tuple[str, str]:
    """The --data_parallel mode to run and why, for the banner (empty for one process). auto: sharded on 2 or more
    GPUs of one host that reach each other's memory (not under --fsdp), else ddp. ddp and sharded differ only in
    rounding (the clip norm's summation order) and share the checkpoint format, so a run may resume under the
    other."""
    if asked not in MODES:
        raise ValueError(f"--data_parallel must be one of {', '.join(MODES)}, got {asked!r}")
    if asked == "sharded":
        if fsdp:
            raise ValueError("--data_parallel sharded and --fsdp are two ways to split the work: pick one")
        if world_size < 2:
            raise ValueError("--data_parallel sharded splits the step over several processes: launch it with "
                             "torchrun (run_dense_finetune.sh --num_gpus 2 or more)")
        if not on_cpu and world_size > local_world_size(world_size):
            raise ValueError("--data_parallel sharded runs on the GPUs of one host (copy engines through each "
                             "other's memory); this run spans several nodes: use ddp")
    if world_size < 2:
        return ("ddp" if asked == "auto" else asked), ""  # one process: nothing to share
    if asked != "auto":
        return asked, f"as asked (--data_parallel {asked})"
    why = ("the CPU" if on_cpu else "--fsdp" if fsdp
           else "several nodes" if world_size != local_world_size(world_size)
           else None if peers_reachable(world_size) else "GPUs that cannot map each other's memory, or a PyTorch "
           "without symmetric memory")
    if why is not None:
        return "ddp", f"auto: DDP, since the sharded step needs the GPUs of one host that reach each other ({why})"
    nvlink = nvlink_between(world_size)
    measured = world_size == SHARDED_MEASURED_GPUS and nvlink is not False
    return "sharded", (
        f"auto: the sharded step, on {world_size} GPUs of one host that reach each other's memory"
        + (" (measured on 2 H200s joined by NVLink: 1.87x to 1.92x one GPU, DDP 1.71x)" if measured else
           f"; not measured on {world_size} GPUs{' linked by PCIe only' if nvlink is False else ''} yet: "
           "--data_parallel ddp runs DDP instead"))


def nvlink_between(n: int) -> Optional[bool]:
    """Whether each of the first n visible GPUs has an active NVLink (NVML, through nvidia-ml-py); None where it
    cannot tell."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [int(i) for i in visible.split(",")] if visible and all(
            i.strip().isdigit() for i in visible.split(",")) else list(range(n))
        for index in ids[:n]:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            links = 0
            for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                try:
                    links += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
                except pynvml.NVMLError:
                    break
            if not links:
                return False
        return True
    except Exception:  # noqa: BLE001 - no driver, no NVML: unknown
        return None


def local_world_size(world_size: int) -> int:
    """Processes on this host: torchrun's LOCAL_WORLD_SIZE (the launcher sets it for --print_config too)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def peers_reachable(n: int) -> bool:
    """Whether the first n visible GPUs can all map each other's memory (NVLink or PCIe peer access) and this
    PyTorch has symmetric memory: what ShardedSparseAdamW's copy engines need."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    if torch.cuda.device_count() < n:
        return False
    return all(torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b)
