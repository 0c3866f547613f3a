"""The run's files (sparse_adamw/pipeline/checkpoints.py): checkpoints written in the background from a snapshot,
what a failed write costs, an end that writes once, and running out of GPU memory in the middle of a run (whose
message memory_plan.py writes).

Oracles: hand-counted bytes and peaks, the weights and optimizer state a callback copies at the checkpoint's step,
the safetensors library reading what the writer wrote, and the sizes of the files a real run leaves.
"""
import errno
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune_helpers import ArithmeticTokens, subprocess_env, tiny_run_args, trainer_args
from sparse_adamw.pipeline import checkpoints
from sparse_adamw.pipeline.checkpoints import save_safetensors
from sparse_adamw.pipeline.memory_plan import GiB, lower_plan_flag, suggested_memory_gb
from sparse_adamw.pipeline.finetune import main
from sparse_adamw.pipeline.prune import prune_magnitude
from sparse_adamw.pipeline.trainer import SparseTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def _args(tiny, out, *extra):
    model_dir, _, corpus = tiny
    return tiny_run_args(model_dir, corpus, out, "--skip_eval", "--logging_steps", 1, *extra)


def _checkpoint_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_the_writer_writes_what_safetensors_reads(tmp_path, dtype):
    tensors = {"b": torch.randn(37, 5).to(dtype), "a.weight": torch.randn(3).to(dtype), "empty": torch.zeros(0, 4)}
    size = save_safetensors(tmp_path / "x.safetensors", tensors)
    assert size == (tmp_path / "x.safetensors").stat().st_size
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


# --------------------------------------------------------------------------------- background checkpoints
class CopyAt(TrainerCallback):
    """Copies the weights and the optimizer state at the end of step `step` (before the checkpoint is taken)."""

    def __init__(self, trainer_ref, step):
        self.trainer_ref, self.step, self.weights, self.state = trainer_ref, step, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            trainer = self.trainer_ref[0]
            self.weights = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}
            self.state = {trainer._param_names[id(p)]: {k: v.detach().cpu().clone() for k, v in s.items()
                                                        if isinstance(v, torch.Tensor)}
                          for p, s in trainer.sparse_optimizer.state.items()}


def _trainer(tiny_llama, out, step_to_copy=2, **overrides):
    torch.manual_seed(0)
    model = tiny_llama()
    prune_magnitude(model, 0.25, progress=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    ref = []
    copy = CopyAt(ref, step_to_copy)
    values = dict(max_steps=5, save_strategy="steps", save_steps=2, save_total_limit=1,
                  use_cpu=not torch.cuda.is_available())
    values.update(overrides)
    trainer = SparseTrainer(model=model, args=trainer_args(out, **values), train_dataset=ArithmeticTokens(),
                            callbacks=[copy], checkpoint_at_end=False)
    trainer._param_names = {id(p): n for n, p in model.named_parameters()}
    ref.append(trainer)
    return trainer, copy


def test_a_background_checkpoint_holds_the_step_it_was_taken_at(tiny_llama, tmp_path):
    """Training goes on while checkpoint-2 is written (on a GPU the copies overlap step 3, whose update waits for
    them): the folder holds step 2's weights and optimizer state, bit for bit, and from_pretrained loads it."""
    from transformers import AutoModelForCausalLM

    trainer, copy = _trainer(tiny_llama, tmp_path / "out", save_total_limit=None)
    trainer.train()
    assert [r.step for r in trainer.checkpoint_writer.records] == [2, 4] and all(
        r.background and r.error is None for r in trainer.checkpoint_writer.records)
    folder = tmp_path / "out" / "checkpoint-2"
    saved = load_file(folder / "model.safetensors")
    for name, weight in copy.weights.items():
        if name in saved:
            assert torch.equal(saved[name], weight), name
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    names = [n for group in state["param_groups"] for n in group["param_names"]]
    for index, values in state["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "block_mask"):
            if key in values:
                assert torch.equal(values[key], copy.state[names[index]][key]), (names[index], key)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.lm_head.weight, copy.weights["lm_head.weight"])
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_a_run_resumed_from_a_background_checkpoint_ends_bit_for_bit_as_one_that_was_not(tiny_llama, tmp_path):
    whole, _ = _trainer(tiny_llama, tmp_path / "whole", save_total_limit=None)
    whole.train()
    resumed, _ = _trainer(tiny_llama, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_where_host_memory_cannot_hold_a_snapshot_checkpoints_are_written_in_place(tiny_llama, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr(checkpoints, "host_memory_available", lambda: 1000)
    trainer, copy = _trainer(tiny_llama, tmp_path / "out", save_total_limit=None)
    trainer.train()
    out = capsys.readouterr().out
    assert out.count("note: checkpoints are written in place, before training goes on: a snapshot needs ") == 1
    assert [(r.step, r.background) for r in trainer.checkpoint_writer.records] == [(2, False), (4, False)]
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(saved[n], w) for n, w in copy.weights.items() if n in saved)


# ----------------------------------------------------------------------------------------- failed writes
def _failing(step, error=NO_SPACE, target="save_safetensors"):
    """A writer function that writes part of the file of checkpoint-`step`, then raises `error`."""
    original = getattr(checkpoints, target)

    def write(*args, **kwargs):
        path = Path(next(a for a in args if isinstance(a, (str, Path))))
        if path.parent.name == f".tmp-checkpoint-{step}":
            path.write_bytes(b"partial")
            raise error
        return original(*args, **kwargs)

    return write


@pytest.mark.parametrize("target, error, shown", [
    ("save_safetensors", NO_SPACE, "OSError: [Errno 28] No space left on device"),
    ("_save_torch", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"),
     "RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"),
])
@pytest.mark.parametrize("background", [True, False], ids=["background", "in_place"])
def test_a_checkpoint_that_cannot_be_written_costs_only_itself(tiny, tmp_path, monkeypatch, capsys, target, error,
                                                               shown, background):
    if not background:
        monkeypatch.setattr(checkpoints, "host_memory_available", lambda: 1000)
    monkeypatch.setattr(checkpoints, target, _failing(4, error, target))
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--max_steps", 7, "--save_steps", 2, "--keep_checkpoints")) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if "could not be written" in line]
    assert lines == [f"warning: checkpoint-4 could not be written ({shown}); its partial files are removed, the "
                     "newest complete checkpoint is checkpoint-2; training goes on"], captured.out
    assert "Step 7: loss=" in captured.out and (out / "model.safetensors").is_file()
    assert _checkpoint_steps(out) == [7] and not list(out.glob(".tmp-*"))
    report = json.loads((out / "finetune_report.json").read_text())
    assert [(c["step"], c["error"] is not None) for c in report["checkpoints"]] == [(2, False), (4, True), (6, False),
                                                                                    (7, False)]


def test_a_small_file_that_cannot_be_written_costs_only_its_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    original = SparseTrainer._save_rng_state

    def failing(self, output_dir):
        if output_dir.endswith(".tmp-checkpoint-2"):
            raise NO_SPACE
        return original(self, output_dir)

    monkeypatch.setattr(SparseTrainer, "_save_rng_state", failing)
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--max_steps", 5, "--save_steps", 2, "--keep_checkpoints")) == 0
    text = capsys.readouterr().out
    assert ("warning: checkpoint-2 could not be written (OSError: [Errno 28] No space left on device); its partial "
            "files are removed, no checkpoint is kept yet; training goes on") in text
    assert _checkpoint_steps(out) == [5] and not list(out.glob(".tmp-*"))


def test_a_final_model_that_cannot_be_written_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    original = SparseTrainer._save

    def failing(self, output_dir=None, state_dict=None):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise NO_SPACE

    monkeypatch.setattr(SparseTrainer, "_save", failing)
    out = tmp_path / "out"
    args = _args(tiny, out, "--max_steps", 7, "--save_steps", 2)
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and err[-1] == (
        f"error: the fine-tuned model could not be written to {out} (OSError: [Errno 28] No space left on device); "
        "checkpoint-6 is kept: make room and rerun the same command to resume from it")
    assert not (out / "model.safetensors").exists() and not (out / ".tmp-final").exists()
    assert _checkpoint_steps(out) == [6]
    monkeypatch.setattr(SparseTrainer, "_save", original)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"Resuming from {out / 'checkpoint-6'}" in text and "Step 7: loss=" in text
    assert (out / "model.safetensors").is_file() and _checkpoint_steps(out) == []


def test_a_crash_mid_write_leaves_the_previous_checkpoint_the_newest(tiny, tmp_path):
    """The process dies (os._exit) while checkpoint-4 is being written: checkpoint-2 is the newest complete one, the
    staging folder is what is left of checkpoint-4, and the same command resumes from checkpoint-2 and finishes."""
    out = tmp_path / "out"
    args = [str(a) for a in _args(tiny, out, "--max_steps", 6, "--save_steps", 2)]
    script = textwrap.dedent('''
        import os, sys
        from pathlib import Path
        from sparse_adamw.pipeline import checkpoints
        from sparse_adamw.pipeline.finetune import main
        original = checkpoints.save_safetensors
        def dying(path, *args, **kwargs):
            if Path(path).parent.name == ".tmp-checkpoint-4":
                Path(path).write_bytes(b"partial")
                os._exit(9)
            return original(path, *args, **kwargs)
        checkpoints.save_safetensors = dying
        sys.exit(main(sys.argv[1:]))
    ''')
    crashed = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                             env=subprocess_env(), timeout=300)
    assert crashed.returncode == 9, crashed.stdout + crashed.stderr
    assert _checkpoint_steps(out) == [2] and (out / ".tmp-checkpoint-4").is_dir()
    assert main(args) == 0
    assert _checkpoint_steps(out) == [] and not (out / ".tmp-checkpoint-4").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6


# ------------------------------------------------------------------------------------- the end writes once
def test_the_end_writes_the_final_model_only_and_one_checkpoint_is_kept_at_a_time(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """Checkpoints at 2, 4 and 6 of 7 steps: while each is written, the one before it is still there (deleted only
    once the newer one is complete), never two complete ones besides; no checkpoint at step 7; at the end none."""
    out = tmp_path / "out"
    seen = []
    original = checkpoints.save_safetensors

    def watching(path, *args, **kwargs):
        if Path(path).parent.name.startswith(".tmp-checkpoint-"):
            seen.append((Path(path).parent.name, _checkpoint_steps(out)))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_safetensors", watching)
    assert main(_args(tiny, out, "--max_steps", 7, "--save_steps", 2)) == 0
    assert seen == [(".tmp-checkpoint-2", []), (".tmp-checkpoint-4", [2]), (".tmp-checkpoint-6", [4])]
    report = json.loads((out / "finetune_report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [2, 4, 6]
    assert _checkpoint_steps(out) == [] and (out / "model.safetensors").is_file()
    assert "checkpoints deleted; --keep_checkpoints" in capsys.readouterr().out


def test_keep_checkpoints_writes_the_last_step_too_and_keeps_it(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny, out, "--max_steps", 7, "--save_steps", 2, "--keep_checkpoints")) == 0
    assert _checkpoint_steps(out) == [7]
    report = json.loads((out / "finetune_report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [2, 4, 6, 7]


# ------------------------------------------------------------------------------------------- out of memory
def test_the_suggested_memory_cap_no_longer_fits_the_chosen_candidate():
    for peak_gib in (7.3, 61.9, 73.8, 76.0):
        cap = suggested_memory_gb(int(peak_gib * GiB), 0.05)
        assert cap * 0.95 < peak_gib <= (cap + 2) * 0.95, (peak_gib, cap)


def test_the_flag_that_lowers_the_plan():
    common = dict(margin=0.05, per_process=8, checkpointing=False)
    assert lower_plan_flag(trial_peak=int(61.9 * GiB), micro_batch=4, **common) == "--max_memory_gb 64"
    assert lower_plan_flag(trial_peak=None, micro_batch=4, **common) == "--per_device_train_batch_size 2"
    assert lower_plan_flag(trial_peak=None, micro_batch=3, margin=0.05, per_process=6,
                                       checkpointing=False) == "--per_device_train_batch_size 2"
    assert lower_plan_flag(trial_peak=None, micro_batch=1, **common) == "--gradient_checkpointing"
    assert lower_plan_flag(trial_peak=None, micro_batch=1, margin=0.05, per_process=8,
                                       checkpointing=True).startswith("--max_memory_gb (below the free memory)")


def test_out_of_memory_mid_run_stops_with_one_message_and_the_flag_resumes(tiny, tmp_path, monkeypatch, capsys):
    """Out of memory in step 5 (after checkpoint-4, at micro-batch 2): one message naming the step, the plan and the
    flag; the same command with that flag resumes from checkpoint-4 at micro-batch 1 (the effective batch stays)."""
    original = SparseTrainer.training_step

    def exhausted(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SparseTrainer, "training_step", exhausted)
    out = tmp_path / "out"
    args = _args(tiny, out, "--max_steps", 6, "--save_steps", 2, "--per_device_train_batch_size", 2)
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        "error: out of GPU memory in step 5 (plan: micro-batch 2 x gradient accumulation 4). The same command with "
        "--per_device_train_batch_size 1 resumes from checkpoint-4, with a smaller plan")
    assert _checkpoint_steps(out) == [4]
    monkeypatch.setattr(SparseTrainer, "training_step", original)
    assert main(args[:-1] + ["1"]) == 0
    text = capsys.readouterr().out
    assert f"Resuming from {out / 'checkpoint-4'}" in text and "effective batch 8 (1 x 1 process(es) x 8)" in text
    assert [int(s) for s in re.findall(r"^Step (\d+): loss", text, re.M)] == [5, 6]
