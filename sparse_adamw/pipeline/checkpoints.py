"""The run's files as training writes them: a disk plan before anything loads, checkpoints written while training
goes on, what a failed write costs, and a clean stop when the GPU runs out of memory in the middle of a run.

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

The disk plan (`plan_disk`) counts the output folder's high-water mark from the model's parameter shapes (its
config, instantiated on the meta device), the prune step's masks, the weights' and states' dtypes and how the
processes share the work, then compares it with the free space there before anything loads.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .run_folder import CHECKPOINT_STAGING, OPTIMIZER_FILE, checkpoint_dirs, folder_size, format_size

GB = 1000 ** 3
GiB = 1024 ** 3
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


# ------------------------------------------------------------------------------------------------- disk plan
@dataclass
class DiskPlan:
    """The output folder's high-water mark for a run, against the free space on its file system."""

    output_dir: Path
    weights: int  # bytes of the weights as a checkpoint and the final model hold them
    optimizer: int  # optimizer.pt (or the ranks' optimizer files)
    small: int  # config, tokenizer, scheduler, RNG states, trainer state, masks
    checkpoint: int  # one checkpoint
    final: int  # the final model
    high_water: int  # the most the folder holds at once
    peak_when: str  # what it holds then
    present: int  # bytes in the folder now
    free: Optional[int]  # free bytes on its file system; None where the folder's disk cannot be found
    notes: List[str] = field(default_factory=list)

    @property
    def needed(self) -> int:
        """Bytes the run still has to add to the folder at its peak."""
        return max(0, self.high_water - self.present)

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free

    def describe(self) -> str:
        free = "free space unknown" if self.free is None else f"{format_size(self.free)} free there"
        return (f"at most {format_size(self.high_water)} in {self.output_dir} ({self.peak_when}); {free}"
                + "".join(f"; {note}" for note in self.notes))


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the file system that holds `path` (or the nearest folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def peak_of(checkpoint: int, final: int, *, keep: Optional[int], save_steps: Optional[int], max_steps: Optional[int],
            start_step: int, present_checkpoints: int, checkpoint_at_end: bool) -> Tuple[int, str]:
    """The most bytes the run's checkpoints and final model take at once, and what they are then.

    Follows the run: a checkpoint every `save_steps` steps after `start_step` (None: none), written beside the
    ones kept, which are trimmed to `keep` once it is complete; at `max_steps` (None: unknown, so as many
    checkpoints as can be), a last checkpoint only with `checkpoint_at_end`, then the final model beside the kept
    ones.
    """
    held, peak, when = present_checkpoints, present_checkpoints * checkpoint, "what it holds now"
    if save_steps:
        if max_steps is None:
            writes = (keep or 1) + 1  # enough to reach the steady state
        else:
            writes = max(0, (max_steps - 1) // save_steps - start_step // save_steps)
        writes += int(checkpoint_at_end)
        for _ in range(writes):
            if (held + 1) * checkpoint > peak:
                peak, when = (held + 1) * checkpoint, _checkpoints(held + 1, checkpoint)
            held = held + 1 if keep is None else min(held + 1, keep)
    if held * checkpoint + final > peak:
        peak = held * checkpoint + final
        when = (f"{_checkpoints(held, checkpoint)} and " if held else "") + f"the final model, {format_size(final)}"
    return peak, when


def _checkpoints(n: int, size: int) -> str:
    return f"{n} checkpoint{'s' if n != 1 else ''} of {format_size(size)}" + (
        ": the newest complete one and the one being written" if n == 2 else "")


def config_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: shape} of a causal LM of this config, instantiated on the meta device (nothing allocated;
    tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


def model_shapes(model: str) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: shape} of a saved model, from its config: nothing is loaded."""
    from transformers import AutoConfig

    from .models import DEFAULT_MODEL, default_model_path

    path = default_model_path() if model == DEFAULT_MODEL else Path(model)
    config = (AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name) if path.suffix == ".gguf"
              else AutoConfig.from_pretrained(str(path)))
    return config_shapes(config)


def adapter_shapes(shapes: Dict[str, Tuple[int, ...]], r: int, target_modules) -> Dict[str, Tuple[int, ...]]:
    """The masked LoRA adapters' parameter shapes (--lora, lora.py) for a model with these parameter shapes: A
    [r, in] and B [out, r] for each 2-D weight `<...>.<target>.weight`."""
    out = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) == 2 and parts[-1] == "weight" and len(parts) > 1 and parts[-2] in target_modules:
            out[f"{'.'.join(parts[:-1])}.lora_A"] = (r, shape[1])
            out[f"{'.'.join(parts[:-1])}.lora_B"] = (shape[0], r)
    return out


def plan_disk(output_dir, model: Optional[str], *, dtype: torch.dtype, state_dtype: torch.dtype,
              masks_file: Optional[str], world_size: int, mode: Optional[str], save_steps: Optional[int],
              max_steps: Optional[int], keep: Optional[int], checkpoint_at_end: bool, start_step: int = 0,
              present_checkpoints: int = 0, fsdp_fp32_weights: bool = False,
              shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
              adapters: Optional[Dict[str, Tuple[int, ...]]] = None) -> DiskPlan:
    """The disk plan of a fine-tune of `model` (or of a model with these parameter `shapes`; module docstring).
    `mode`: None (one process), "ddp", "sharded" or "fsdp". `adapters`: the shapes of the masked LoRA adapters
    (adapter_shapes) when only they train: the checkpoints hold them and their state, the end adds them
    beside the merged model."""
    from ..masks import load_masks

    shapes = model_shapes(model) if shapes is None else shapes
    masks, block, notes = {}, (16, 16), []
    if masks_file and Path(masks_file).is_file():
        masks, block = load_masks(masks_file)
    elif masks_file is None:
        notes.append("optimizer state counted dense (no block masks file to count the live blocks from)")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    item = torch.empty((), dtype=dtype).element_size()
    state_item = torch.empty((), dtype=state_dtype).element_size()
    live = {name: int(masks[name].sum()) * block[0] * block[1] if name in masks else n for name, n in numel.items()}
    weights = sum(numel.values()) * item
    optimizer = 2 * state_item * sum(live.values())
    optimizer += sum(int(m.numel()) for m in masks.values())  # the masks travel with the state, a byte a block
    small = _small_files(model)  # config and tokenizer, in every checkpoint and the final model
    # + each process's RNG state, the scheduler, the trainer state and the training arguments (a few kB each)
    checkpoint = weights + optimizer + small + 16 * 1024 * (max(1, world_size) + 1)
    adapter = 0
    if adapters is not None:
        adapter_numel = sum(math.prod(shape) for shape in adapters.values())
        adapter, optimizer = adapter_numel * item, 2 * state_item * adapter_numel
        checkpoint = adapter + optimizer + small + 16 * 1024 * (max(1, world_size) + 1)
        # the adapter beside the merged model: its weights, its masks and its config
        adapter += sum(int(m.numel()) for m in masks.values()) + 4 * 1024
    if mode == "fsdp":
        # The gathered model twice (model.safetensors and accelerate's own copy), in fp32 under bf16 autocast.
        fsdp_weights = sum(numel.values()) * (4 if fsdp_fp32_weights else item)
        checkpoint += 2 * fsdp_weights - weights
        weights = fsdp_weights
        notes.append("FSDP2's layout is estimated, not measured")
    # + the trainer state, the run's record and its report
    final = weights + small + sum(int(m.numel()) for m in masks.values()) + 16 * 1024 + adapter
    peak, when = peak_of(checkpoint, final, keep=keep, save_steps=save_steps, max_steps=max_steps,
                         start_step=start_step, present_checkpoints=present_checkpoints,
                         checkpoint_at_end=checkpoint_at_end)
    output_dir = Path(output_dir)
    present = folder_size(output_dir) if output_dir.is_dir() else 0
    return DiskPlan(output_dir, weights, optimizer, small, checkpoint, final, peak, when, present,
                    free_bytes(output_dir), notes)


def disk_plan(plan) -> Optional[DiskPlan]:
    """plan_disk for a fine-tune's resolved Plan (finetune_config.py), before anything is loaded; None when the model
    is not there yet (the prune step makes it)."""
    from .models import DEFAULT_MODEL, resolve_dtype

    a, t = plan.args, plan.training
    if not Path(a.model).exists() and a.model != DEFAULT_MODEL:
        return None
    strategy = str(t.get("save_strategy", "steps")).rsplit(".", 1)[-1].lower()
    save_steps, max_steps = t["save_steps"], (t["max_steps"] if t["max_steps"] > 0 else None)
    if strategy == "no":
        save_steps = None
    elif strategy != "steps" or save_steps < 1:  # per epoch, or a fraction of the run: cadence unknown here
        save_steps, max_steps = 1, None
    else:
        save_steps = int(save_steps)
    mode = "fsdp" if t.get("fsdp") else None if plan.world_size == 1 else a.data_parallel
    adapters = None if plan.lora is None else adapter_shapes(model_shapes(a.model), plan.lora.r,
                                                             plan.lora.target_modules)
    return plan_disk(t["output_dir"], a.model, dtype=resolve_dtype(a.dtype), state_dtype=resolve_dtype(a.state_dtype),
                     masks_file=a.masks_file, world_size=plan.world_size, mode=mode, save_steps=save_steps,
                     max_steps=max_steps, keep=t.get("save_total_limit"), checkpoint_at_end=a.keep_checkpoints,
                     start_step=plan.status.resume_step,
                     present_checkpoints=len(checkpoint_dirs(t["output_dir"])) if plan.resume_from else 0,
                     fsdp_fp32_weights=bool(t.get("bf16")), adapters=adapters)


def describe_disk_plan(plan) -> str:
    """The banner's line: the estimate, or why there is none."""
    try:
        disk = disk_plan(plan)
    except (OSError, ValueError) as err:
        return f"not estimated ({err})"
    if disk is None:
        return "estimated once the prune step has made the model"
    return disk.describe() + ("" if disk.fits else " -- DOES NOT FIT")


def _small_files(model: Optional[str]) -> int:
    """Bytes of the tokenizer and config files next to a saved model (what every checkpoint copies)."""
    path = Path(model or "")
    if model is None or not path.is_dir():
        return 16 * 1024 * 1024  # a .gguf model: its tokenizer, written out, is a few MB
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".model", ".txt")
               and not p.name.endswith(".index.json"))


def disk_refusal(plan: DiskPlan, *, checkpoints: bool, state_dtype: torch.dtype, keep: Optional[int]) -> str:
    """The one message that stops a run whose output folder's disk cannot hold it: needed, free, and the flags that
    lower the need."""
    ways = []
    if checkpoints and keep is not None and keep > 1:
        ways.append(f"--save_total_limit 1 ({format_size(2 * plan.checkpoint)} at the peak)")
    if state_dtype == torch.float32:
        ways.append("--state_dtype bfloat16 (half the optimizer state)")
    if checkpoints:
        ways.append(f"--save_strategy no (no checkpoints: {format_size(plan.final)}, but nothing to resume from "
                    "after a crash)")
    ways.append("--output_dir on a larger disk")
    return (f"the run needs {format_size(plan.needed)} more in {plan.output_dir} at its peak ({plan.peak_when}), "
            f"and {format_size(plan.free)} is free there. Lower it with " + ", or ".join(ways)
            + "; --skip_disk_check starts anyway")


# -------------------------------------------------------------------------------------------- out of memory
def suggested_memory_gb(trial_peak: int, margin: float) -> int:
    """A --max_memory_gb under which the plan's chosen candidate no longer fits: its trial peak over the budget."""
    return max(1, math.floor(trial_peak / GiB / (1 - margin)) - 1)


def lower_plan_flag(*, trial_peak: Optional[int], margin: float, micro_batch: int, per_process: int,
                    checkpointing: bool) -> str:
    """The flag that lowers the plan: under the memory plan, a --max_memory_gb its choice no longer fits; else the
    next smaller micro-batch that divides the sequences a process takes per step, or checkpointing."""
    if trial_peak is not None:
        return f"--max_memory_gb {suggested_memory_gb(trial_peak, margin)}"
    if micro_batch > 1:
        return f"--per_device_train_batch_size {max(b for b in range(1, micro_batch) if per_process % b == 0)}"
    if not checkpointing:
        return "--gradient_checkpointing"
    return "--max_memory_gb (below the free memory) or more GPUs with --fsdp"


def out_of_memory_message(step: int, *, plan_text: str, trial_peak: Optional[int], run_peak: Optional[int],
                          flag: str, resume_from: Optional[str]) -> str:
    """One message: the step, the plan, the peaks, the flag that lowers the plan, and where a rerun resumes (the
    name of the newest checkpoint)."""
    peaks = []
    if trial_peak is not None:
        peaks.append(f"trial peak {trial_peak / GiB:.1f} GiB")
    if run_peak is not None:
        peaks.append(f"this run's peak {run_peak / GiB:.1f} GiB")
    where = f"resumes from {resume_from}" if resume_from else "starts again (no checkpoint was written yet)"
    return (f"out of GPU memory in step {step} (plan: {plan_text}" + (f"; {', '.join(peaks)}" if peaks else "")
            + f"). The same command with {flag} {where}, with a smaller plan")
