"""sparse_adamw.pipeline.run_folder: atomic writes, checkpoint checks, the fingerprint, and what a rerun finds in an
output folder (run_config.json against the new configuration and schedule)."""
import json

import pytest
import torch

from finetune_helpers import small_checkpoint
from sparse_adamw.pipeline import run_folder
from sparse_adamw.pipeline.run_folder import (
    RECORD_FORMAT,
    RUN_CONFIG,
    RunFolderError,
    atomic_write,
    clear_run,
    find_checkpoint,
    fingerprint,
    fingerprint_differences,
    format_size,
    inspect,
    install,
    load_weights,
    read_checkpoint,
    remove_checkpoints,
    write_json,
)

CONFIG = {"model": "/m", "block_size": 32, "learning_rate": 0.003, "seed": 42}
STEPS = {"max_steps": 10, "num_train_epochs": 3.0}
EPOCHS = {"max_steps": -1, "num_train_epochs": 3.0}


def _record(folder, config=CONFIG, schedule=STEPS, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / RUN_CONFIG, {"format": RECORD_FORMAT, "config": config, "schedule": schedule,
                                     "fingerprint": {}, "completed_steps": None, **extra})


# ---------------------------------------------------------------------------------------------- writes
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "a.json", {"old": 1})

    def write_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_then_fail)
    assert json.loads(path.read_text()) == {"old": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_install_renames_every_file_into_place_and_removes_the_staging(tmp_path):
    staging = tmp_path / ".tmp-final"
    staging.mkdir()
    for name in ("model.safetensors", "config.json", "training_args.bin"):
        (staging / name).write_text(name)
    (tmp_path / "model.safetensors").write_text("old")
    assert install(staging, tmp_path, skip=("training_args.bin",)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_text() == "model.safetensors" and not staging.exists()
    assert not (tmp_path / "training_args.bin").exists()


def test_clear_run_and_remove_checkpoints(tmp_path):
    for step in (2, 4, 6):
        small_checkpoint(tmp_path, step)
    assert remove_checkpoints(tmp_path, keep_last=True) == [tmp_path / "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    _record(tmp_path)
    (tmp_path / "model.safetensors").write_text("kept")
    (tmp_path / "finetune_report.json.tmp").write_text("")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert format_size(999) == "999 bytes" and format_size(3.8e9) == "3.8 GB"


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_checks(tmp_path):
    checkpoint, problem = read_checkpoint(small_checkpoint(tmp_path, 4, max_steps=10))
    assert problem is None and (checkpoint.step, checkpoint.max_steps) == (4, 10)
    rng = tmp_path / "checkpoint-4" / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:50])
    assert "rng_state.pth is damaged" in read_checkpoint(tmp_path / "checkpoint-4")[1]
    sharded = small_checkpoint(tmp_path, 6)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert read_checkpoint(sharded)[1] == "model-00002-of-00002.safetensors is missing"
    found, broken = find_checkpoint(tmp_path)
    assert found is None and [p.name for p, _ in broken] == ["checkpoint-6", "checkpoint-4"]


def test_load_weights_takes_a_checkpoints_tensors(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied: saved once
    save_file({"0.weight": torch.ones(4, 4), "0.bias": torch.ones(4), "1.bias": torch.ones(4)},
              str(tmp_path / "model.safetensors"))
    load_weights(model, tmp_path)
    assert torch.equal(model[1].weight, torch.ones(4, 4)) and torch.equal(model[1].bias, torch.ones(4))
    save_file({"0.weight": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 2 of the model's weights"):
        load_weights(model, tmp_path)


# ------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_reads_only_what_changed_and_names_it(tmp_path, monkeypatch):
    files = [tmp_path / "config.json", tmp_path / "model.safetensors"]
    for f in files:
        f.write_text(f.name)
    first = fingerprint(files)
    read = []
    real = run_folder._sha256
    monkeypatch.setattr(run_folder, "_sha256", lambda path: read.append(path.name) or real(path))
    assert fingerprint(files, first) == first and read == []  # unchanged in size and time: not read again
    files[1].write_text("other weights")
    second = fingerprint(files, first)
    assert read == ["model.safetensors"] and second["sha256"] != first["sha256"]
    lines = fingerprint_differences({"weights": first, "masks": None}, {"weights": second, "masks": None})
    assert len(lines) == 1 and lines[0].startswith("  weights: model.safetensors (sha256 ")
    assert fingerprint([]) is None


# ------------------------------------------------------------------------------------- what a rerun finds
def test_a_new_folder_and_one_without_a_record(tmp_path):
    assert inspect(tmp_path / "new", CONFIG, STEPS).record is None
    small_checkpoint(tmp_path, 4)
    with pytest.raises(RunFolderError, match="holds checkpoints but no run_config.json"):
        inspect(tmp_path, CONFIG, STEPS)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is a file"):
        inspect(tmp_path / "file", CONFIG, STEPS)


def test_every_difference_that_changes_the_result_is_named(tmp_path):
    _record(tmp_path)
    small_checkpoint(tmp_path, 4)
    with pytest.raises(RunFolderError) as error:
        inspect(tmp_path, {**CONFIG, "learning_rate": 0.001, "seed": 7}, STEPS)
    message = str(error.value)
    assert "  learning_rate: 0.003 -> 0.001\n  seed: 42 -> 7\n" in message and "block_size" not in message
    assert message.endswith("use another --output_dir, or --overwrite_output_dir to start afresh (deleting its "
                            "checkpoints).")


@pytest.mark.parametrize("schedule, problem", [
    ({"max_steps": 3, "num_train_epochs": 3.0}, "max_steps: 10 -> 3 (this run has already trained 4 steps)"),
    (EPOCHS, "max_steps: 10 -> -1 (a schedule in steps and one in epochs cannot continue each other)"),
])
def test_a_schedule_that_cannot_continue_is_refused(tmp_path, schedule, problem):
    _record(tmp_path)
    small_checkpoint(tmp_path, 4)
    with pytest.raises(RunFolderError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        inspect(tmp_path, CONFIG, schedule)


def test_resume_continue_and_complete(tmp_path):
    _record(tmp_path)
    small_checkpoint(tmp_path, 4, max_steps=10)
    for steps in (6, 10, 20):  # shorter down to the steps trained, or longer: the run goes on from its checkpoint
        status = inspect(tmp_path, CONFIG, {**STEPS, "max_steps": steps})
        assert (status.resume_step, status.trained, status.complete) == (4, False, False)
    assert inspect(tmp_path, CONFIG, {**STEPS, "max_steps": 4}).trained  # every step trained: only the end is left
    _record(tmp_path, completed_steps=10, completed_max_steps=10)
    assert inspect(tmp_path, CONFIG, STEPS).complete
    with pytest.raises(RunFolderError, match="complete run of 10 steps and no checkpoint to train on from"):
        inspect(tmp_path, CONFIG, {**STEPS, "max_steps": 20})
    small_checkpoint(tmp_path, 10, max_steps=10)  # kept by --keep_checkpoints
    status = inspect(tmp_path, CONFIG, {**STEPS, "max_steps": 20})
    assert status.resume_step == 10 and not status.complete and not status.trained


def test_a_schedule_in_epochs(tmp_path):
    _record(tmp_path, schedule=EPOCHS)
    small_checkpoint(tmp_path, 30, max_steps=30)
    assert inspect(tmp_path, CONFIG, EPOCHS).trained
    assert not inspect(tmp_path, CONFIG, {**EPOCHS, "num_train_epochs": 4.0}).trained
    with pytest.raises(RunFolderError, match="num_train_epochs: 3 -> 2"):
        inspect(tmp_path, CONFIG, {**EPOCHS, "num_train_epochs": 2.0})
    _record(tmp_path, schedule=EPOCHS, completed_steps=30, completed_max_steps=30)
    assert inspect(tmp_path, CONFIG, EPOCHS).complete


def test_damaged_checkpoints_are_skipped(tmp_path):
    _record(tmp_path)
    small_checkpoint(tmp_path, 4)
    (small_checkpoint(tmp_path, 6) / "trainer_state.json").write_text("")
    status = inspect(tmp_path, CONFIG, STEPS)
    assert status.resume_step == 4 and [(p.name, why) for p, why in status.broken] == [
        ("checkpoint-6", "trainer_state.json is unreadable or has no global_step")]
