"""What a fine-tuning run keeps in its output folder, and what a rerun reads back from it.

    run_config.json       the resolved configuration (everything that changes the result), the schedule, a
                          fingerprint of the starting weights and masks and, once the run is complete, its steps
    checkpoint-N/         the newest complete checkpoint while the run goes on (written as .tmp-checkpoint-N/ and
                          renamed once complete: checkpoints.py); once the run is complete, none (or the last one,
                          with --keep_checkpoints)
    the fine-tuned model (weights, config, tokenizer), block_masks.pt, trainer_state.json, finetune_report.json

Every file is written under a temporary name and renamed into place (os.replace), so a kill leaves the old file or
the new one, never half of one; the final model is written into STAGING and its files renamed into the folder.
A rerun compares its configuration with run_config.json (inspect), resumes from the newest checkpoint that passes
cheap checks (find_checkpoint: damaged ones are named and skipped), and refuses a folder it cannot vouch for.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

RUN_CONFIG = "run_config.json"
REPORT_FILE = "finetune_report.json"
TRAINER_STATE = "trainer_state.json"
STAGING = ".tmp-final"  # the final model is saved here, then its files are renamed into the output folder
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_STAGING = ".tmp-"  # + checkpoint-N: a checkpoint being written; renamed to checkpoint-N once complete
OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's name; holds SparseAdamW's state in the one-process format
SCHEDULER_FILE = "scheduler.pt"
RECORD_FORMAT = 1
WAYS_OUT = "use another --output_dir, or --overwrite_output_dir to start afresh (deleting its checkpoints)"


class RunFolderError(ValueError):
    """The output folder holds a run this command must not continue; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path, write: Callable[[Path], Any]) -> Path:
    """write(temporary path), then rename it to `path`: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, data) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())  # small files: the rename must not reach the disk before the data

    return atomic_write(path, write)


def read_json(path) -> Optional[dict]:
    """The JSON object in `path`, None when there is no such file; ValueError when it does not parse."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def install(staging: Path, output_dir: Path, skip: Tuple[str, ...] = ()) -> List[str]:
    """Rename every file and folder of `staging` into `output_dir` (each arrives whole; a folder replaces the one of
    its name), then remove `staging`."""
    moved = []
    for path in sorted(staging.iterdir()):
        if path.name in skip:
            continue
        if path.is_dir():
            shutil.rmtree(output_dir / path.name, ignore_errors=True)
        os.replace(path, output_dir / path.name)
        moved.append(path.name)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


# ------------------------------------------------------------------------------------------------ checkpoints
def sharded_optimizer_file(rank: int, world_size) -> str:
    """Name of one rank's optimizer state in a checkpoint saved with FSDP2's SHARDED_STATE_DICT."""
    return f"optimizer-rank{rank}-of-{world_size}.pt"


@dataclass
class Checkpoint:
    path: Path
    step: int
    max_steps: Optional[int]  # as the Trainer computed it for that run


def checkpoint_dirs(output_dir) -> List[Tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder, newest first."""
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = CHECKPOINT.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def newest_checkpoint(output_dir) -> Optional[str]:
    """The name of the newest checkpoint-N folder, or None."""
    found = checkpoint_dirs(output_dir)
    return found[0][1].name if found else None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Whether the header parses and the file is as long as the header says (a truncated copy is not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if length > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"{path.name} is damaged ({type(err).__name__})"
    if 8 + length + end != size:
        return f"{path.name} is truncated ({size:,} bytes where its header needs {8 + length + end:,})"
    return None


def _torch_file_problem(path: Path) -> Optional[str]:
    """torch.load, memory-mapped (the tensors are not read): the zip directory and the pickle must be whole."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means the Trainer could not load it either
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        return f"{path.name} does not load ({type(err).__name__}{': ' + first if first else ''})"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    """A torch file that holds more than tensors (the RNG states): its zip archive must be whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{path.name} is damaged ({err})"
    return f"{path.name} is damaged ({bad})" if bad else None


def _weights_problem(path: Path) -> Optional[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is damaged"
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return f"{missing[0]} is missing"
        return next((p for p in (_safetensors_problem(path / s) for s in shards) if p), None)
    if (path / "model.safetensors").is_file():
        return _safetensors_problem(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return _torch_file_problem(path / "pytorch_model.bin")
    if any(path.glob("pytorch_model_fsdp*")):  # FSDP's own formats: accepted as they are
        return None
    return "no model weights"


def _optimizer_problem(path: Path) -> Optional[str]:
    optimizer = [path / OPTIMIZER_FILE] if (path / OPTIMIZER_FILE).is_file() else sorted(
        path.glob(sharded_optimizer_file("*", "*")))
    if not optimizer:
        return f"no {OPTIMIZER_FILE}"
    if not (path / SCHEDULER_FILE).is_file():
        return f"no {SCHEDULER_FILE}"  # without it the Trainer would quietly start the optimizer afresh
    problems = [_torch_file_problem(p) for p in optimizer + [path / SCHEDULER_FILE]]
    problems += [_zip_problem(p) for p in sorted(path.glob("rng_state*.pth"))]
    return next((p for p in problems if p), None)


def read_checkpoint(path) -> Tuple[Optional[Checkpoint], Optional[str]]:
    """(the checkpoint, None) when it passes the cheap checks, else (None, what is wrong)."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        return None, f"no {TRAINER_STATE} (cut short while saving)"
    try:
        state = read_json(path / TRAINER_STATE) or {}
        step, max_steps = state["global_step"], state.get("max_steps")
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None, f"{TRAINER_STATE} is unreadable or has no global_step"
    problem = _weights_problem(path) or _optimizer_problem(path)
    if problem:
        return None, problem
    return Checkpoint(path, step, max_steps if isinstance(max_steps, int) else None), None


def read_final_model(output_dir) -> Optional[Checkpoint]:
    """The fine-tuned model in the output folder itself, when its weights are whole and its trainer_state.json says
    which step it holds (what a run leaves when it stops after writing it and before marking itself complete)."""
    path = Path(output_dir)
    try:
        state = read_json(path / TRAINER_STATE) or {}
    except ValueError:
        return None
    step, max_steps = state.get("global_step"), state.get("max_steps")
    if not isinstance(step, int) or isinstance(step, bool) or _weights_problem(path):
        return None
    return Checkpoint(path, step, max_steps if isinstance(max_steps, int) else None)


def find_checkpoint(output_dir) -> Tuple[Optional[Checkpoint], List[Tuple[Path, str]]]:
    """The newest checkpoint that passes read_checkpoint's checks, and the damaged ones newer than it."""
    broken = []
    for _, path in checkpoint_dirs(output_dir):
        checkpoint, problem = read_checkpoint(path)
        if checkpoint is not None:
            return checkpoint, broken
        broken.append((path, problem))
    return None, broken


def load_weights(model: torch.nn.Module, checkpoint, trainable_only: bool = False) -> None:
    """Copy a checkpoint's safetensors weights into `model`; a weight tied to a loaded one (lm_head to the
    embeddings) comes along. ValueError when the files do not cover the model (with `trainable_only`: its
    parameters that train, as a checkpoint without the frozen weights holds them)."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    index = read_json(path / "model.safetensors.index.json")
    files = [path / name for name in sorted(set(index["weight_map"].values()))] if index else [
        path / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path} has no safetensors weights to finish the run from; {WAYS_OUT}")
    expected, loaded = model.state_dict(), set()
    for f in files:
        weights = load_file(str(f))
        unknown = sorted(set(weights) - set(expected))
        if unknown:
            raise ValueError(f"{f} holds weights the model does not have, e.g. {unknown[:3]}")
        model.load_state_dict(weights, strict=False)
        loaded |= set(weights)
    shared = {expected[k].data_ptr() for k in loaded}
    if trainable_only:
        expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in expected if k not in loaded and expected[k].data_ptr() not in shared]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the model's weights, e.g. {missing[:3]}")


def remove_checkpoints(output_dir, keep_last: bool = False) -> List[Path]:
    """Delete the checkpoint folders (all, or all but the newest); returns the ones kept."""
    found = checkpoint_dirs(output_dir)
    kept = [path for _, path in found[:1]] if keep_last else []
    for _, path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
    return kept


def clear_leftovers(output_dir) -> None:
    """What an interrupted write leaves: the staging folders (of the final model and of checkpoints) and *.tmp
    files."""
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)
    for staging in output_dir.glob(CHECKPOINT_STAGING + "checkpoint-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for tmp in output_dir.glob("*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def clear_run(output_dir) -> None:
    """--overwrite_output_dir: the checkpoints, the record and the report go; the new run rewrites the rest."""
    remove_checkpoints(output_dir)
    clear_leftovers(output_dir)
    for name in (RUN_CONFIG, REPORT_FILE):
        (Path(output_dir) / name).unlink(missing_ok=True)


def folder_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def format_size(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


# ------------------------------------------------------------------------------------------------ fingerprint
def weight_files(model) -> List[Path]:
    """The files that make a model's starting point: a .gguf file, or a directory's config and weights."""
    path = Path(model)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix == ".gguf" or p.name.endswith(".safetensors.index.json")
        or (p.name.startswith(("model", "pytorch_model")) and p.suffix in (".safetensors", ".bin"))))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(files: List[Path], known: Optional[dict] = None) -> Optional[dict]:
    """sha256 of each file and of them all. A file whose size and modification time (ns) match `known` (an
    earlier fingerprint) keeps its recorded hash without being read again."""
    if not files:
        return None
    entries = {}
    for path in files:
        stat = path.stat()
        old = ((known or {}).get("files") or {}).get(path.name) or {}
        same = old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns
        entries[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                              "sha256": old["sha256"] if same and old.get("sha256") else _sha256(path)}
    whole = hashlib.sha256("".join(f"{n} {e['sha256']}\n" for n, e in sorted(entries.items())).encode())
    return {"sha256": whole.hexdigest(), "files": entries}


def fingerprint_differences(old: Dict[str, Optional[dict]], new: Dict[str, Optional[dict]]) -> List[str]:
    """One line per part ("weights", "masks") whose files differ, naming the files."""
    lines = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if (a or {}).get("sha256") == (b or {}).get("sha256"):
            continue
        fa, fb = (a or {}).get("files") or {}, (b or {}).get("files") or {}
        changed = [n for n in sorted(set(fa) | set(fb)) if (fa.get(n) or {}).get("sha256") != (fb.get(n) or {}).get(
            "sha256")]
        what = ", ".join(f"{n} ({_short(fa.get(n))} -> {_short(fb.get(n))})" for n in changed[:4])
        lines.append(f"  {part}: {what or 'changed'}")
    return lines


def _short(entry: Optional[dict]) -> str:
    return "absent" if not entry else f"sha256 {entry['sha256'][:12]}"


# ---------------------------------------------------------------------------------------- what a rerun finds
@dataclass
class Status:
    """What a run finds in its output folder."""

    record: Optional[dict] = None  # run_config.json as found; None for a new run
    resume_from: Optional[str] = None  # the checkpoint to resume from
    resume_step: int = 0
    broken: List[Tuple[Path, str]] = field(default_factory=list)  # damaged checkpoints newer than resume_from
    complete: bool = False  # finished with this configuration: nothing to do
    trained: bool = False  # resume_from holds every step: only the final model, evaluation and report are left


def _show(value) -> str:
    return "(none)" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def config_differences(old: dict, new: dict) -> List[str]:
    """`  key: old -> new` for every key whose value differs (`new` as JSON would store it)."""
    new = json.loads(json.dumps(new, default=str))
    return [f"  {key}: {_show(old.get(key))} -> {_show(new.get(key))}"
            for key in list(new) + [k for k in old if k not in new] if old.get(key) != new.get(key)]


def _schedule_problem(old: dict, new: dict, progress: int) -> Optional[str]:
    """A longer schedule continues; a shorter one only down to the steps already trained; steps <-> epochs never."""
    old_steps, new_steps = old["max_steps"] > 0, new["max_steps"] > 0
    if old_steps != new_steps:
        return (f"  max_steps: {old['max_steps']} -> {new['max_steps']} (a schedule in steps and one in epochs "
                "cannot continue each other)")
    if new_steps and new["max_steps"] < progress:
        return f"  max_steps: {old['max_steps']} -> {new['max_steps']} (this run has already trained {progress} steps)"
    if not new_steps and new["num_train_epochs"] < old["num_train_epochs"]:
        return f"  num_train_epochs: {old['num_train_epochs']:g} -> {new['num_train_epochs']:g} (fewer epochs)"
    return None


def _refuse(output_dir, lines: List[str]) -> RunFolderError:
    return RunFolderError(f"{output_dir} holds a run with another configuration ({RUN_CONFIG}: old -> new):\n"
                          + "\n".join(lines) + f"\nTo run this configuration, {WAYS_OUT}.")


def _reached(schedule: dict, same_schedule: bool, step: int, max_steps: Optional[int]) -> bool:
    """Whether `step` is the end of `schedule` (in epochs: only the run's own count, `max_steps`, tells)."""
    if schedule["max_steps"] > 0:
        return step >= schedule["max_steps"]
    return same_schedule and max_steps is not None and step >= max_steps


def inspect(output_dir, config: dict, schedule: dict) -> Status:
    """What to do in `output_dir` with this configuration and schedule; RunFolderError when it must not run."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output_dir {output_dir} is a file, not a folder")
    try:
        record = read_json(output_dir / RUN_CONFIG)
        if record is not None and not (record.get("format") == RECORD_FORMAT and isinstance(record.get("config"), dict)
                                       and isinstance(record.get("schedule"), dict)):
            raise ValueError(f"{output_dir / RUN_CONFIG} is not a run record of this version")
    except ValueError as err:
        raise RunFolderError(f"{err}; {WAYS_OUT}") from None
    checkpoint, broken = find_checkpoint(output_dir)
    if record is None:
        if checkpoint is not None or broken:
            raise RunFolderError(
                f"{output_dir} holds checkpoints but no {RUN_CONFIG} (made by an older version of this command or by "
                f"another tool): their configuration and starting weights cannot be checked. {WAYS_OUT[0].upper()}"
                f"{WAYS_OUT[1:]}.")
        return Status()
    done = record.get("completed_steps")
    progress = done if done is not None else checkpoint.step if checkpoint else 0
    problems = config_differences(record["config"], config)
    problems += [p for p in [_schedule_problem(record["schedule"], schedule, progress)] if p]
    if problems:
        raise _refuse(output_dir, problems)
    same = json.loads(json.dumps(schedule)) == record["schedule"]
    if done is not None:
        if _reached(schedule, same, done, record.get("completed_max_steps")):
            return Status(record, complete=True)
        if checkpoint is None or checkpoint.step != done:
            raise RunFolderError(
                f"{output_dir} holds a complete run of {done} steps and no checkpoint to train on from (only "
                f"--keep_checkpoints keeps one). To train longer, {WAYS_OUT}.")
    status = Status(record, broken=broken)
    if checkpoint is not None:
        status.resume_from, status.resume_step = str(checkpoint.path), checkpoint.step
        status.trained = _reached(schedule, same, checkpoint.step, checkpoint.max_steps)
    final = read_final_model(output_dir)
    if (final is not None and final.step > status.resume_step
            and _reached(schedule, same, final.step, final.max_steps)):
        # The end writes no checkpoint: a run stopped after writing its final model finishes from the model itself.
        status.resume_from, status.resume_step, status.trained = str(final.path), final.step, True
    return status
