"""The disk plan (sparse_adamw/pipeline/disk_plan.py): the peak follows the run's writes, the bytes follow the live
blocks and the dtypes, the plan is within 10% of what a real run writes, and a disk too small stops the run before
anything loads.

Oracles: hand-counted bytes and peaks, and the sizes of the files a real run leaves.
"""
import json
import re

import pytest
import torch

from finetune_helpers import tiny_run_args
from sparse_adamw.pipeline import checkpoints, disk_plan
from sparse_adamw.pipeline.run_folder import folder_size
from sparse_adamw.pipeline.disk_plan import peak_of, plan_disk
from sparse_adamw.pipeline.finetune import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tiny, out, *extra):
    model_dir, _, corpus = tiny
    return tiny_run_args(model_dir, corpus, out, "--skip_eval", "--logging_steps", 1, *extra)


@pytest.mark.parametrize("case, expected", [
    # checkpoint 10, final 4, one kept: a new one beside the kept one, then the final model beside the last
    (dict(keep=1, save_steps=5, max_steps=20, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 20),
    (dict(keep=2, save_steps=5, max_steps=20, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 30),
    (dict(keep=1, save_steps=5, max_steps=8, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 14),
    (dict(keep=1, save_steps=5, max_steps=8, start_step=0, present_checkpoints=0, checkpoint_at_end=True), 20),
    (dict(keep=1, save_steps=None, max_steps=8, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 4),
    (dict(keep=1, save_steps=5, max_steps=4, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 4),
    # resumed at step 15 of 20 from the checkpoint in the folder: no periodic one is left, only the final model
    (dict(keep=1, save_steps=5, max_steps=20, start_step=15, present_checkpoints=1, checkpoint_at_end=False), 14),
    (dict(keep=1, save_steps=5, max_steps=None, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 20),
    (dict(keep=None, save_steps=5, max_steps=21, start_step=0, present_checkpoints=0, checkpoint_at_end=False), 44),
])
def test_the_peak_follows_the_run(case, expected):
    assert peak_of(10, 4, **case)[0] == expected


def test_the_plan_counts_the_live_blocks_and_the_dtypes(tiny, tmp_path):
    model_dir, masks, _ = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = dict(model.named_parameters())
    numel = sum(p.numel() for p in params.values())
    live = sum(int(masks[n].sum()) * 256 if n in masks else p.numel() for n, p in params.items())
    common = dict(masks_file=str(model_dir / "block_masks.pt"), world_size=1, mode=None, save_steps=2, max_steps=7,
                  keep=1, checkpoint_at_end=False)
    fp32 = plan_disk(tmp_path / "out", str(model_dir), dtype=torch.float32, state_dtype=torch.float32, **common)
    bf16 = plan_disk(tmp_path / "out", str(model_dir), dtype=torch.bfloat16, state_dtype=torch.bfloat16, **common)
    assert fp32.weights == 4 * numel and bf16.weights == 2 * numel
    masks_bytes = sum(m.numel() for m in masks.values())
    assert fp32.optimizer == 2 * 4 * live + masks_bytes and bf16.optimizer == 2 * 2 * live + masks_bytes
    assert fp32.high_water == 2 * fp32.checkpoint  # one kept, one being written
    assert fp32.fits and fp32.free > 0


@pytest.mark.parametrize("lora", [[], ["--lora", "--lora_r", "4"]], ids=["full", "lora"])
def test_the_plan_is_within_10_percent_of_what_a_run_writes(tiny, tmp_path, monkeypatch, capsys, lora):
    """The run's real files: a kept checkpoint, the final model, and the folder's size at its peak (measured when
    the older checkpoint is about to be deleted, beside the newer complete one). With --lora the checkpoints hold
    the adapters only, and the end adds the adapter's folder beside the merged model."""
    out = tmp_path / "out"
    peaks = []
    rotate = checkpoints.rotate_checkpoints

    def measured(run_dir, keep, newest):
        peaks.append(folder_size(run_dir))
        return rotate(run_dir, keep, newest)

    monkeypatch.setattr(checkpoints, "rotate_checkpoints", measured)
    assert main(_args(tiny, out, "--max_steps", 7, "--save_steps", 2, "--keep_checkpoints", *lora)) == 0
    peaks.append(folder_size(out))  # the end: the kept checkpoint beside the final model
    text = capsys.readouterr().out
    planned = re.search(r"Disk plan: at most ([\d.]+) [kMG]?B", text)
    assert planned, text
    report = json.loads((out / "finetune_report.json").read_text())
    plan = report["disk_plan"]
    kept = out / "checkpoint-7"
    checkpoint = sum(p.stat().st_size for p in kept.iterdir())
    final = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and kept not in p.parents)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == bool(lora)
    assert abs(plan["checkpoint_bytes"] - checkpoint) <= 0.1 * checkpoint, (plan, checkpoint)
    assert abs(plan["final_bytes"] - final) <= 0.1 * final, (plan, final)
    assert abs(plan["high_water_bytes"] - max(peaks)) <= 0.1 * max(peaks), (plan, peaks)


def test_a_disk_too_small_stops_the_run_before_anything_loads(tiny, tmp_path, monkeypatch, capsys):
    import sparse_adamw.pipeline.models as models

    out = tmp_path / "out"
    monkeypatch.setattr(disk_plan, "free_bytes", lambda path: 1_000_000)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(_args(tiny, out, "--max_steps", 7, "--save_steps", 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    message = err[0]
    assert message.startswith("error: the run needs ") and f"more in {out} at its peak (2 checkpoints of " in message
    assert "and 1.0 MB is free there. Lower it with " in message
    for flag in ("--save_strategy no", "--output_dir on a larger disk", "--state_dtype bfloat16",
                 "--skip_disk_check"):
        assert flag in message, flag
    assert not (out / "run_config.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(disk_plan, "free_bytes", lambda path: 1_000_000)
    assert main(_args(tiny, out, "--max_steps", 4, "--save_steps", 2, "--skip_disk_check")) == 0
    assert "(--skip_disk_check: starting anyway)" in capsys.readouterr().out


def test_the_banner_and_the_dry_run_show_the_plan(tiny, tmp_path, capsys):
    assert main(_args(tiny, tmp_path / "out", "--print_config")) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("DISK_PLAN="))
    assert re.search(r"at most [\d.]+ MB in .*out \(2 checkpoints of [\d.]+ MB: the newest complete one and the one "
                     r"being written\); [\d.]+ GB free there", line), line
