"""Checkpoints written while training goes on, and what a failed write costs (the disk they need is planned in
disk_plan.py).

Checkpoints (SparseTrainer._save_checkpoint hands them to a CheckpointWriter):

- At a checkpoint the trainer takes a snapshot. The weights and the optimizer state are copied into host buffers
  that are kept from one checkpoint to the next (`HostCopies`; page-locked on CUDA machines, so the copies run on a
  copy engine), and the small files (config, tokenizer, scheduler, RNG states, trainer_state.json) are written at
  once. In one process the copies overlap the next step's forward and backward: only that step's optimizer update
  waits for them, on the GPU.
- A writer thread then writes the weights (safetensors) and optimizer.pt while training goes on. The file writes
  release the GIL, so the training thread keeps launching work.
- Everything goes into `.tmp-checkpoint-N`, which is renamed to `checkpoint-N` once every file is written and
  synced: a folder named checkpoint-N is complete. Only then are older checkpoints deleted, down to
  save_total_limit. A crash mid-write leaves the previous checkpoint as the newest complete one, and the next run
  removes the staging folder.
- A write that fails (a full disk, any other I/O error) removes its staging folder and prints one line; the newest
  complete checkpoint stays, and training goes on.
- Where host memory cannot hold a snapshot, the same files are written in place: from the live tensors, before
  training goes on. FSDP2 (whose weights and state are gathered as they are written) always writes in place.

torch.distributed.checkpoint's async_save does the snapshot-then-write too, but in its own sharded format (.distcp
files and a .metadata file): the Trainer's resume and `from_pretrained` read neither, and it assumes optimizer state
shaped like the parameters, which SparseAdamW's compact state is not. So the writer here writes the formats the
rest of the pipeline already reads.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .run_folder import CHECKPOINT_STAGING, OPTIMIZER_FILE, checkpoint_dirs, folder_size, format_size

ALIGN = 64  # tensors in a host buffer start on a cache line
# Host memory a snapshot may take: what the kernel says is available, less this share for everything else.
HOST_MEMORY_HEADROOM = 0.2


# ------------------------------------------------------------------------------------------------ safetensors
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor, without a copy where it is a contiguous CPU tensor (one at a time from a GPU)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def save_safetensors(path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> int:
    """Write `tensors` to `path` in the safetensors format and fsync it; returns the bytes written.

    safetensors' own save_file first copies every tensor into a Python bytes object, holding the GIL for each copy:
    this writes each tensor's memory as it is, so a writer thread leaves the training thread free.
    """
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors.values():
            if t.numel():
                f.write(_as_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(encoded) + offset


def _save_torch(obj, path) -> int:
    """torch.save, fsync'd; returns the file's size."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


# ----------------------------------------------------------------------------------------------- host copies
class _Flat:
    """Host tensors of the given (shape, dtype) layout carved from one allocation per dtype (torch.save refuses
    views of one storage as different dtypes); page-locked where `pin`."""

    def __init__(self, layout: List[Tuple[Tuple[int, ...], torch.dtype]], pin: bool):
        self.layout = layout
        offsets, totals = [], {}
        for shape, dtype in layout:
            step = max(1, ALIGN // torch.empty((), dtype=dtype).element_size())
            start = totals.get(dtype, 0)
            offsets.append(start)
            totals[dtype] = start + -(-math.prod(shape) // step) * step
        self.buffers = {dtype: torch.empty(max(n, 1), dtype=dtype) for dtype, n in totals.items()}
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers.values())
        self.pinned = [b for b in self.buffers.values() if pin and _register(b)]
        for buffer in self.buffers.values():
            if all(buffer is not locked for locked in self.pinned):
                buffer.zero_()  # its pages now (page-locking does that too), not in the first snapshot's copies
        if pin and len(self.pinned) < len(self.buffers):
            print(f"note: {format_size(self.nbytes)} of host memory could not be page-locked for checkpoint "
                  "snapshots (the locked-memory limit?): their copies from the GPU run at pageable speed", flush=True)
        self.views = [self.buffers[dtype][start:start + math.prod(shape)].view(shape)
                      for (shape, dtype), start in zip(layout, offsets)]

    def release(self) -> None:
        for buffer in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        self.pinned, self.views, self.buffers = [], [], {}


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock a host tensor's memory for the GPU's copy engines (cudaHostRegister); False where it cannot."""
    try:
        nbytes = buffer.numel() * buffer.element_size()
        return int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0
    except (RuntimeError, AttributeError):
        return False


class HostCopies:
    """Host copies of tensors, in buffers kept from one checkpoint to the next: one allocation per kind ("weights",
    "optimizer"), so torch.save writes one storage per kind and nothing is allocated or page-locked again while the
    layout stays the same. `copy` issues the copies on the current stream (non-blocking from a GPU)."""

    def __init__(self):
        self._flat: Dict[str, _Flat] = {}

    def reserve(self, layouts: Dict[str, List[Tuple[Tuple[int, ...], torch.dtype]]], pin: bool) -> None:
        """Allocate the buffers of each kind's layout now (a thread may do it while training goes on)."""
        for kind, layout in layouts.items():
            self._buffer(kind, layout, pin)

    def _buffer(self, kind: str, layout, pin: bool) -> _Flat:
        flat = self._flat.get(kind)
        if flat is None or flat.layout != layout:
            if flat is not None:
                flat.release()
            flat = self._flat[kind] = _Flat(layout, pin)
        return flat

    def copy(self, kind: str, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        flat = self._buffer(kind, [(tuple(t.shape), t.dtype) for t in tensors], pin=any(t.is_cuda for t in tensors))
        for view, t in zip(flat.views, tensors):
            view.copy_(t, non_blocking=t.is_cuda)
        return flat.views

    @property
    def nbytes(self) -> int:
        return sum(flat.nbytes for flat in self._flat.values())

    def release(self) -> None:
        for flat in self._flat.values():
            flat.release()
        self._flat = {}


def tensors_of(tree) -> List[torch.Tensor]:
    """The tensors of a nested dict/list/tuple, in a fixed order (what `replace_tensors` puts back)."""
    found: List[torch.Tensor] = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(tree)
    return found


def replace_tensors(tree, tensors: Sequence[torch.Tensor]):
    """A copy of `tree` whose tensors are `tensors`, in tensors_of's order; everything else is deep-copied."""
    it = iter(tensors)

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            return next(it)
        if isinstance(node, dict):
            return {key: rebuild(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(value) for value in node)
        return copy.deepcopy(node)

    return rebuild(tree)


class Snapshots:
    """A checkpoint's weights and optimizer state copied into host buffers (HostCopies) while training goes on.

    On a GPU the copies run on a stream of their own; `take(..., wait=False)` leaves the waiting to the next
    optimizer update, through `wait_for_copies` (an optimizer step pre-hook: a wait on the GPU, the host goes on).
    `reserve` allocates and page-locks the buffers on a thread, ahead of the first checkpoint. Both say no (False),
    and print one line, when host memory cannot hold a snapshot: the checkpoints are then written in place.
    """

    def __init__(self):
        self.copies = HostCopies()
        self.reserved = False
        self._stream = None
        self._pending = None  # the CUDA event of the last snapshot's copies, until an update waits for it
        self._reserving: Optional[threading.Thread] = None

    def room(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether host memory holds a snapshot of `tensors` (the buffers already held count as room)."""
        needed = sum(t.numel() * t.element_size() for t in tensors)
        available = host_memory_available()
        if available is None or needed <= self.copies.nbytes + available * (1 - HOST_MEMORY_HEADROOM):
            return True
        self.copies.release()
        print(f"note: checkpoints are written in place, before training goes on: a snapshot needs "
              f"{format_size(needed)} of host memory and {format_size(available)} is available", flush=True)
        return False

    def reserve(self, weights: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> bool:
        self.reserved = True
        if not self.room(list(weights) + list(state)):
            return False
        layouts = {kind: [(tuple(t.shape), t.dtype) for t in tensors]
                   for kind, tensors in (("weights", weights), ("optimizer", state)) if tensors}
        self._reserving = threading.Thread(target=self.copies.reserve, args=(layouts, any(t.is_cuda for t in weights)),
                                           name="snapshot-buffers", daemon=True)
        self._reserving.start()
        return True

    def take(self, job: "CheckpointJob", fresh: bool, wait: bool) -> bool:
        """Replace the job's live weights (and, unless `fresh`, its optimizer state's tensors) by host copies; False,
        leaving the job as it is, where host memory cannot hold them."""
        if self._reserving is not None:  # the buffers allocated ahead of time
            self._reserving.join()
            self._reserving = None
        state = [] if fresh or job.optimizer is None else tensors_of(job.optimizer)
        sources = list(job.weights.values()) + state
        if not self.room(sources):
            return False
        cuda = any(t.is_cuda for t in sources)
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
            weights = self.copies.copy("weights", list(job.weights.values()))
            copied = self.copies.copy("optimizer", state) if state else []
            if cuda:
                for t in sources:
                    if t.is_cuda:
                        t.record_stream(self._stream)
                job.ready = torch.cuda.Event()
                job.ready.record(self._stream)
        job.weights = dict(zip(job.weights, weights))
        if state:
            job.optimizer = replace_tensors(job.optimizer, copied)
        if cuda and wait:
            job.ready.synchronize()
        elif cuda:
            self._pending = job.ready
        return True

    def wait_for_copies(self, optimizer=None, args=None, kwargs=None) -> None:
        """Optimizer step pre-hook: the update must not start before the snapshot's copies have read the weights and
        the state."""
        event, self._pending = self._pending, None
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


def host_memory_available() -> Optional[int]:
    """Bytes the kernel says a process can still take (MemAvailable), None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------- the writer
# What a failed write raises: OSError from the file system, RuntimeError from torch.save's writer ("unexpected pos",
# "file write failed"), and safetensors' own error type.
try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - older safetensors
    _SafetensorError = OSError
WRITE_ERRORS = (OSError, RuntimeError, _SafetensorError)


def describe_error(err: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class CheckpointJob:
    """What the writer writes into `staging` (the small files are there already) before renaming it to `final`."""

    step: int
    staging: Path
    final: Path
    weights: Dict[str, torch.Tensor]
    optimizer: Any = None  # optimizer.pt's contents (None: no optimizer file)
    ready: Any = None  # a CUDA event the host copies complete at
    keep: Optional[int] = None  # complete checkpoints to keep once this one is (save_total_limit)
    stall_s: float = 0.0  # training time the snapshot took


@dataclass
class CheckpointRecord:
    """One checkpoint as finetune_report.json keeps it."""

    step: int
    stall_s: float  # how long training waited for it
    write_s: Optional[float] = None
    bytes: Optional[int] = None
    background: bool = True
    error: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class CheckpointWriter:
    """Writes checkpoints on a thread of its own (`background`), or at once; one at a time.

    `submit` returns at once in the background; `wait` returns when the last checkpoint submitted is complete (or
    failed). `say` prints the one line each checkpoint gets.
    """

    def __init__(self, background: bool = True, say: Callable[[str], None] = None):
        self.background = background
        self.say = say or (lambda text: print(text, flush=True))
        self.records: List[CheckpointRecord] = []
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: CheckpointJob, wait: bool = False) -> None:
        self.wait()
        record = CheckpointRecord(job.step, job.stall_s, background=self.background and not wait)
        self.records.append(record)
        if not record.background:
            self._write(job, record)
            return
        self._thread = threading.Thread(target=self._write, args=(job, record), name=f"checkpoint-{job.step}",
                                        daemon=True)  # a second Ctrl+C must not wait for it
        self._thread.start()

    def wait(self) -> float:
        """Block until the checkpoint being written is complete; returns the seconds waited."""
        if self._thread is None:
            return 0.0
        start = time.perf_counter()
        self._thread.join()
        self._thread = None
        return time.perf_counter() - start

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write(self, job: CheckpointJob, record: CheckpointRecord) -> None:
        start = time.perf_counter()
        try:
            if job.ready is not None:
                job.ready.synchronize()  # the host copies have landed
            save_safetensors(job.staging / "model.safetensors", job.weights)
            if job.optimizer is not None:
                _save_torch(job.optimizer, job.staging / OPTIMIZER_FILE)
            _sync_folder(job.staging)
            if job.final.exists():  # a checkpoint of the same step from an earlier, interrupted try
                shutil.rmtree(job.final)
            os.replace(job.staging, job.final)
            _sync_folder(job.final.parent)
        except WRITE_ERRORS as err:
            record.error = describe_error(err)
            self.say(discard_failed_checkpoint(job.final, job.staging, err))
            return
        finally:
            job.weights, job.optimizer = {}, None  # the host buffers are free for the next snapshot
        record.write_s = time.perf_counter() - start
        record.bytes = folder_size(job.final)
        removed = rotate_checkpoints(job.final.parent, job.keep, newest=job.final)
        how = (f"written in the background in {record.write_s:.1f} s; training paused {record.stall_s:.2f} s"
               if record.background else f"written in {record.write_s + record.stall_s:.1f} s")
        self.say(f"Checkpoint {job.final.name}: {format_size(record.bytes)}, {how}"
                 + (f" (deleted {', '.join(p.name for p in removed)})" if removed else ""))


def discard_failed_checkpoint(final: Path, partial: Path, err: BaseException) -> str:
    """Remove what a failed write of checkpoint `final` left at `partial`; the one line that says so."""
    shutil.rmtree(partial, ignore_errors=True)
    newest = next((path.name for _, path in checkpoint_dirs(final.parent) if path != final), None)
    return (f"warning: {final.name} could not be written ({describe_error(err)}); its partial files are removed, "
            + (f"the newest complete checkpoint is {newest}" if newest else "no checkpoint is kept yet")
            + "; training goes on")


def _sync_folder(path: Path) -> None:
    """fsync a folder, so that the renames and files in it reach the disk before what depends on them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs folders
    finally:
        os.close(fd)


def rotate_checkpoints(run_dir, keep: Optional[int], newest: Path) -> List[Path]:
    """Delete the oldest complete checkpoints so that `keep` remain, `newest` among them (None: keep all)."""
    if keep is None or keep < 1:
        return []
    found = [path for _, path in checkpoint_dirs(run_dir) if path != newest]
    removed = found[keep - 1:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def staging_folder(final: Path) -> Path:
    return final.with_name(CHECKPOINT_STAGING + final.name)
