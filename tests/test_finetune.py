"""python -m sparse_adamw.pipeline.finetune: defaults, a short run on a tiny model, another block shape, resume,
Ctrl+C, DDP through torchrun; reruns (complete, another configuration, other weights, damaged checkpoints), Ctrl+C in
every phase (and between the renames of the final model), SIGTERM outside training, bad input that fails at once,
and runs interrupted and killed that end bitwise equal to one that was not."""
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from finetune_helpers import (
    Child,
    Finetune,
    learnable_corpus,
    pruned_blocks_are_zero,
    pruned_tiny_model,
    run_finetune,
    small_checkpoint,
    subprocess_env,
    tiny_run_args,
)
from sparse_adamw.pipeline.cli import CPU_BLOCK_SIZE
from sparse_adamw.pipeline.finetune import main
from sparse_adamw.pipeline.run_folder import find_checkpoint
from sparse_adamw.pipeline.finetune_config import (
    _split,
    build_parser,
    format_lr,
    gradient_accumulation_for,
    parse_arguments,
    resolve_arguments,
)
from sparse_adamw.masks import MASKS_FILE, expand_block_mask, load_masks, save_masks

STEP_LINE = re.compile(r"^Step (\d+): loss=(\d+\.\d{4})\b", re.M)


pytestmark = pytest.mark.usefixtures("one_thread")


def _resolve(argv, cuda=False, bf16=False, world_size=1):
    args, training = _split(build_parser().parse_args(argv))
    return resolve_arguments(args, training, cuda_available=cuda, bf16_supported=bf16, world_size=world_size)


def _losses(text):
    return [(int(step), float(loss)) for step, loss in STEP_LINE.findall(text)]


# ---------------------------------------------------------------------------------------------- defaults
def test_gradient_accumulation_keeps_the_effective_batch_at_8():
    assert [gradient_accumulation_for(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert gradient_accumulation_for(2, per_device_batch_size=2) == 2
    assert gradient_accumulation_for(1, effective_batch_size=4) == 4
    for n in (3, 5, 16):
        with pytest.raises(ValueError, match="1, 2, 4 or 8 GPUs"):
            gradient_accumulation_for(n)


def test_guide_defaults_on_gpus():
    model = "out/llama2_7b/block_16x16_20sparsity/wanda/pruned_model"
    plan = _resolve(["--model", model, "--dataset", "wikitext"], cuda=True, bf16=True, world_size=2)
    t, a = plan.training, plan.args
    assert (a.block_size, a.max_train_samples, a.max_eval_windows) == (1024, 30000, 0)
    assert (t["num_train_epochs"], t["max_steps"], t["learning_rate"]) == (3.0, -1, 5e-5)
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"], plan.effective_batch_size) == (1, 4, 8)
    assert t["bf16"] is True and a.dtype == "bfloat16" and not t.get("use_cpu")
    assert a.state_dtype == "bfloat16"  # the optimizer states follow the weights, as torch AdamW's do
    assert _resolve(["--model", model, "--state_dtype", "float32"], cuda=True, bf16=True).args.state_dtype == "float32"
    assert _resolve(["--model", model, "--dtype", "float32"], cuda=True, bf16=True).args.state_dtype == "float32"
    assert t["output_dir"] == "out/llama2_7b/block_16x16_20sparsity/wanda/dense_finetuned_model"
    assert (t["logging_steps"], t["save_steps"]) == (10, 500)
    assert not plan.cpu_default and plan.resume_from is None
    with pytest.raises(ValueError, match="1, 2, 4 or 8 GPUs"):
        _resolve(["--model", model], cuda=True, world_size=3)
    # An explicit accumulation is kept (and then any number of processes goes).
    assert _resolve(["--model", model, "--gradient_accumulation_steps", "3"], cuda=True,
                    world_size=3).effective_batch_size == 9


def test_the_memory_plan_decides_on_gpus_what_the_command_line_leaves_open(capsys):
    model = "out/llama2_7b/block_16x16_20sparsity/wanda/pruned_model"
    auto = _resolve(["--model", model], cuda=True, bf16=True)
    assert auto.memory_plan and auto.given == {"per_device_train_batch_size": None, "gradient_checkpointing": None,
                                               "gradient_accumulation_steps": None}
    assert _resolve(["--model", model, "--per_device_train_batch_size", "2"], cuda=True).memory_plan  # checkpointing
    assert _resolve(["--model", model, "--gradient_checkpointing"], cuda=True).given["gradient_checkpointing"] is True
    assert not _resolve(["--model", model, "--per_device_train_batch_size", "2", "--gradient_checkpointing", "False"],
                        cuda=True).memory_plan
    assert not _resolve(["--model", model, "--gradient_accumulation_steps", "4"], cuda=True).memory_plan
    assert not _resolve(["--model", model]).memory_plan  # the CPU
    with pytest.raises(ValueError, match="--max_memory_gb is for GPUs"):
        _resolve(["--model", model, "--max_memory_gb", "80"])
    with pytest.raises(ValueError, match="--max_memory_gb must be positive"):
        _resolve(["--model", model, "--max_memory_gb", "0"], cuda=True)
    with pytest.raises(ValueError, match="--use_liger_kernel needs a GPU"):
        _resolve(["--model", model, "--use_liger_kernel"])
    # A DDP run does not make DDP search for unused parameters after every backward.
    assert _resolve(["--model", model], cuda=True, world_size=2).training["ddp_find_unused_parameters"] is False


def test_the_packaged_model_pruned_anywhere_takes_its_own_learning_rate(tmp_path):
    """The prune step's report names the packaged model as the source: its recipe's rate (5e-4; masked LoRA
    2e-3), wherever the folder is. Another source, or no report, takes the rate for your own model (5e-5; masked
    LoRA 2e-4)."""
    import json

    folders = {}
    for name, source in (("copy", "smollm2-135m"), ("other", str(tmp_path))):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "prune_report.json").write_text(json.dumps({"model": source, "source": source}))
    folders["bare"] = tmp_path / "bare"
    folders["bare"].mkdir()
    rate = lambda name, *extra: _resolve(["--model", str(folders[name]), *extra], cuda=True,  # noqa: E731
                                         bf16=True).training["learning_rate"]
    assert (rate("copy"), rate("other"), rate("bare")) == (5e-4, 5e-5, 5e-5)
    assert (rate("copy", "--lora"), rate("other", "--lora")) == (2e-3, 2e-4)
    assert rate("copy", "--learning_rate", "3e-4") == 3e-4


def test_cpu_offline_default_is_cpu_sized():
    plan = _resolve([])
    t, a = plan.training, plan.args
    assert plan.cpu_default and plan.on_cpu
    assert a.model == "out/smollm2-135m/block_16x16_20sparsity/wanda/pruned_model"
    assert t["output_dir"] == "out/smollm2-135m/block_16x16_20sparsity/wanda/dense_finetuned_model"
    assert (a.block_size, a.max_eval_windows, a.dtype, a.state_dtype) == (CPU_BLOCK_SIZE, 16, "float32", "float32")
    assert (t["max_steps"], t["learning_rate"], t["gradient_accumulation_steps"]) == (40, 5e-4, 4)
    assert t["bf16"] is False and t["use_cpu"] is True
    # Explicit flags win over the CPU-sized defaults; a given --model is not the offline default.
    plan = _resolve(["--max_steps", "5", "--block_size", "64", "--learning_rate", "2e-4"])
    assert (plan.training["max_steps"], plan.args.block_size, plan.training["learning_rate"]) == (5, 64, 2e-4)
    assert not _resolve(["--model", "some/dir"]).cpu_default
    with pytest.raises(ValueError, match="bf16"):
        _resolve(["--bf16"])


def test_print_config_is_shell_readable(capsys):
    assert main(["--print_config", "--model", "x/pruned_model", "--num_processes", "4"]) == 0
    values = dict(shlex.split(line)[0].split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert values["MODEL"] == "x/pruned_model" and values["MODEL_NOTE"] == " (not found here)"
    assert values["INPUT_ERROR"].startswith("--model x/pruned_model does not exist") and values["RUN_STATE"] == "new"
    assert values["OUTPUT_DIR"] == "x/dense_finetuned_model"
    assert (values["GRADIENT_ACCUMULATION"], values["EFFECTIVE_BATCH"], values["LEARNING_RATE"]) == ("2", "8", "5e-5")
    assert format_lr(1e-4) == "1e-4" and format_lr(2.5e-5) == "2.5e-5"


def test_find_checkpoint_skips_an_incomplete_one(tmp_path):
    assert find_checkpoint(tmp_path) == (None, [])
    for step in (5, 10):
        small_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-20").mkdir()  # a kill during its save: trainer_state.json, written last, is missing
    (tmp_path / "checkpoint-20" / "model.safetensors").write_bytes(b"")
    found, broken = find_checkpoint(tmp_path)
    assert found.path == tmp_path / "checkpoint-10" and found.step == 10
    assert broken == [(tmp_path / "checkpoint-20", "no trainer_state.json (cut short while saving)")]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "optimizer.pt truncated": lambda c: _truncate(c / "optimizer.pt"),
    "model.safetensors truncated": lambda c: _truncate(c / "model.safetensors"),
    "trainer_state.json empty": lambda c: (c / "trainer_state.json").write_text(""),
    "scheduler.pt missing": lambda c: (c / "scheduler.pt").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, damage):
    small_checkpoint(tmp_path, 10)
    DAMAGES[damage](small_checkpoint(tmp_path, 20))
    found, broken = find_checkpoint(tmp_path)
    assert found.path == tmp_path / "checkpoint-10"
    assert [path for path, _ in broken] == [tmp_path / "checkpoint-20"] and broken[0][1], broken


BAD_INPUTS = {  # flags -> what the one error line says
    "missing model": (["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere does not exist"),
    "not a model": (["--model", "{tmp}"], "has no config.json"),
    "missing masks": (["--masks_file", "{tmp}/masks.pt"], "--masks_file {tmp}/masks.pt does not exist"),
    "missing corpus": (["--dataset_path", "{tmp}/none.txt"], "--dataset_path {tmp}/none.txt does not exist"),
    "zero learning rate": (["--learning_rate", "0"], "--learning_rate must be positive"),
    "zero steps": (["--max_steps", "0"], "--max_steps must be positive"),
    "zero save steps": (["--save_steps", "0"], "--save_steps must be positive"),
    "negative logging steps": (["--logging_steps", "-1"], "--logging_steps must be positive"),
    "one-token sequences": (["--block_size", "1"], "--block_size must be at least 2"),
    "bad block shape": (["--prune_block", "16y16"], "block shape must look like 16 or 16x16"),
    "output is a file": (["--output_dir", "{tmp}/file"], "--output_dir {tmp}/file is a file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_at_once_with_one_line(tiny, tmp_path, capsys, case):
    """Checked before any model is loaded: exit 2 within two seconds, one error line naming the flag."""
    model_dir, _, corpus = tiny
    (tmp_path / "file").write_text("")
    flags, expected = BAD_INPUTS[case]
    flags = [f.format(tmp=tmp_path) for f in flags]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run_args(model_dir, corpus, tmp_path / "out", "--skip_eval", "--max_steps", 1) + flags)
    assert exit_info.value.code == 2 and time.perf_counter() - started < 2.0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and expected.format(tmp=tmp_path) in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_help_lists_our_flags_and_the_trainers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--masks_file", "--dataset", "--block_size", "--max_train_samples",
                 "--overwrite_output_dir", "--gradient_accumulation_steps", "--gradient_checkpointing",
                 "--print_config"):
        assert flag in out, flag


# ------------------------------------------------------------------------------------------------- runs
def test_a_short_run_learns_keeps_sparsity_and_saves_a_loadable_model(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, masks, corpus = tiny
    out = tmp_path / "finetuned"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 12, "--max_eval_windows", 8, "--save_steps",
                              10)) == 0
    text = capsys.readouterr().out
    assert "*** Starting sparse full fine-tuning ***\nInitial model sparsity: 0.2500\n" in text
    assert re.search(r"^Trainable params: 106,816 \|\| All params: 106,816 \|\| Trainable%: 100\.00$", text, re.M)
    losses = _losses(text)
    assert [s for s, _ in losses] == [2, 4, 6, 8, 10, 12]
    assert losses[-1][1] < 0.9 * losses[0][1], losses
    assert re.search(r"^Sparsity \(exact zeros\)\s+0\.2500\s+0\.2500$", text, re.M)
    assert re.search(r"^Pruned 16x16 blocks\s+0\.2500\s+0\.2500$", text, re.M)

    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", MASKS_FILE,
                 "finetune_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["perplexity"]["after"] < report["perplexity"]["before"]
    assert report["sparsity"]["before"] == report["sparsity"]["after"] == 0.25
    assert report["pruned_block_fraction"]["before"] == report["pruned_block_fraction"]["after"] == 0.25
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
    # the checkpoint of step 10, taken while training went on, is timed apart from the steps; the end writes the
    # fine-tuned model only, no checkpoint of step 12 beside it
    assert [c["step"] for c in report["checkpoints"]] == [10] and report["checkpoints"][0]["background"]
    assert report["checkpoint_s"] > 0 and report["steady_tokens_per_s"] > 0
    assert re.search(r"^Training: 12 steps, [\d.]+ s, [\d,]+ tokens/s \([\d,]+ once warm\), of which [\d.]+ s paused "
                     r"for 1 checkpoint; total [\d.]+ s$", text, re.M), text

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    pruned = AutoModelForCausalLM.from_pretrained(model_dir)
    saved_masks, block = load_masks(out / MASKS_FILE)
    assert block == (16, 16) and set(saved_masks) == set(masks)
    params, before = dict(model.named_parameters()), dict(pruned.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(saved_masks[name], mask), name
        assert pruned_blocks_are_zero(params[name], mask), f"{name}: a pruned block is nonzero"
        assert not torch.equal(params[name], before[name]), f"{name} did not train"


def test_live_weights_that_are_exactly_zero_still_train(tiny, tmp_path, capsys):
    """A quantized checkpoint has exact zeros inside live blocks; the masks, not `W == 0`, decide what trains."""
    from transformers import AutoModelForCausalLM

    model_dir, masks, corpus = tiny
    name = "model.layers.0.mlp.up_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    weight = dict(model.named_parameters())[name]
    live = expand_block_mask(masks[name], weight.shape).nonzero()[:64]
    with torch.no_grad():
        weight[live[:, 0], live[:, 1]] = 0.0
    model.save_pretrained(model_dir)
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "out", "--max_steps", 4, "--skip_eval")) == 0
    text = capsys.readouterr().out
    before = float(re.search(r"^Initial model sparsity: (\S+)$", text, re.M).group(1))
    assert before > 0.25
    assert re.search(rf"^Sparsity \(exact zeros\)\s+{before:.4f}\s+0\.2500$", text, re.M), text
    assert re.search(r"^Pruned 16x16 blocks\s+0\.2500\s+0\.2500$", text, re.M)
    assert "every pruned block is still exactly zero" in text
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())[name]
    assert bool((trained[live[:, 0], live[:, 1]] != 0).all()), "live weights that started at zero were frozen"


def test_a_masks_file_in_8x8_blocks_reports_its_own_pruned_fraction(tmp_path, tiny_llama, capsys):
    """--masks_file brings 8x8 blocks while --prune_block keeps its default 16x16: the pruned fraction before and
    after training is measured in the file's blocks."""
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, block=(8, 8))
    corpus = learnable_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval",
                              "--masks_file", model_dir / MASKS_FILE)) == 0
    # By hand: the elements inside the 8x8 blocks the masks prune, over all decoder Linear weights.
    weights = {name: p for name, p in tiny_llama().named_parameters()
               if name.startswith("model.layers.") and p.dim() == 2}
    assert set(weights) == set(masks)
    pruned = sum(int((~masks[name].repeat_interleave(8, 0).repeat_interleave(8, 1)[:w.shape[0], :w.shape[1]]).sum())
                 for name, w in weights.items())
    expected = pruned / sum(w.numel() for w in weights.values())
    assert expected > 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["pruned_block_fraction"]["before"] == report["pruned_block_fraction"]["after"] == expected
    assert re.search(rf"^Pruned 8x8 blocks\s+{expected:.4f}\s+{expected:.4f}$", capsys.readouterr().out, re.M)
    assert load_masks(out / MASKS_FILE)[1] == (8, 8)


def test_rerun_resumes_from_the_last_checkpoint(tiny, tmp_path, capsys):
    """A complete run kept its last checkpoint (--keep_checkpoints): a larger --max_steps trains on from it."""
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 4, "--save_steps", 2, "--skip_eval",
                              "--keep_checkpoints")) == 0
    assert "kept checkpoint-4" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 6, "--save_steps", 2, "--skip_eval")) == 0
    text = capsys.readouterr().out
    assert f"Resuming from {out / 'checkpoint-4'}" in text
    assert [s for s, _ in _losses(text)] == [6]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert not list(out.glob("checkpoint-*"))
    # Now there is no checkpoint to go on from: a longer run is refused, naming the ways out.
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run_args(model_dir, corpus, out, "--max_steps", 8, "--skip_eval"))
    assert exit_info.value.code == 2
    assert "no checkpoint to train on from" in capsys.readouterr().err
    # --overwrite_output_dir starts afresh.
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval", "--overwrite_output_dir",
                              "--keep_checkpoints")) == 0
    text = capsys.readouterr().out
    assert "Resuming" not in text and [s for s, _ in _losses(text)] == [2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_plan_only_says_what_the_run_would_use_and_touches_nothing(tiny, tmp_path, capsys):
    """--plan_only: the run's micro-batch, accumulation and checkpointing (on the CPU, no memory plan), with the model
    loaded; --overwrite_output_dir alongside deletes nothing, and a folder that holds a run with other flags is no
    reason to refuse (a run with those flags would be)."""
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--save_steps", 2, "--skip_eval",
                              "--keep_checkpoints")) == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--save_steps", 2, "--skip_eval",
                              "--keep_checkpoints", "--overwrite_output_dir", "--plan_only")) == 0
    text = capsys.readouterr().out
    assert ("Plan only (the CPU: no memory plan): micro-batch 1 x 1 process(es) x gradient accumulation 8 = effective "
            "batch 8, checkpointing off, Liger-Kernel off; nothing trained") in text, text
    assert "Step 2:" not in text
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    other = ["--max_steps", 2, "--save_steps", 2, "--skip_eval", "--keep_checkpoints", "--learning_rate", "1e-3"]
    with pytest.raises(SystemExit) as refused:
        main(tiny_run_args(model_dir, corpus, out, *other))
    assert refused.value.code == 2
    capsys.readouterr()
    assert main(tiny_run_args(model_dir, corpus, out, *other, "--plan_only")) == 0
    assert "nothing trained" in capsys.readouterr().out
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_rerun_of_a_complete_run_changes_nothing(tiny, tmp_path, capsys):
    """It says the run is complete, where and what its results are, and exits 0 with every file byte-identical
    (it used to train one step past the end and overwrite the model and the report). What the run keeps once
    complete: the model, tokenizer, masks, report, trainer state and run_config.json, no checkpoint."""
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    args = tiny_run_args(model_dir, corpus, out, "--max_steps", 4, "--save_steps", 2, "--max_eval_windows", 4)
    assert main(args) == 0
    assert re.search(rf"^Output folder: {re.escape(str(out))}, [\d.]+ kB on disk \(checkpoints deleted",
                     capsys.readouterr().out, re.M)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", MASKS_FILE, "finetune_report.json",
            "trainer_state.json", "run_config.json"} <= names, names
    assert not [n for n in names if n.startswith(("checkpoint-", ".tmp")) or n.endswith(".tmp")], names
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The same run, and one that differs only in what does not change the result.
    for extra in ([], ["--logging_steps", 1, "--save_steps", 3, "--max_eval_windows", 2, "--skip_eval"]):
        assert main(args + list(map(str, extra))) == 0
        text = capsys.readouterr().out
        assert f"This run is already complete (4 steps): the fine-tuned model and finetune_report.json are in {out}" \
            in text, text
        assert re.search(r"^  perplexity [\d.]+ -> [\d.]+ \| out of domain [\d.]+ -> [\d.]+ \| sparsity \(exact zeros\) "
                         r"0\.2500 -> 0\.2500", text, re.M), text
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_rerun_with_another_configuration_is_refused_before_loading(tiny, tmp_path, capsys):
    """Every difference that changes the result is named, old -> new, with the two ways out; nothing is loaded."""
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval")) == 0
    capsys.readouterr()
    changed = tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval", "--block_size", 64,
                            "--learning_rate", "1e-3", "--seed", 7, "--gradient_accumulation_steps", 4)
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(changed)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for line in ("  block_size: 32 -> 64", "  effective_batch_size: 8 -> 4", "  learning_rate: 0.003 -> 0.001",
                 "  seed: 42 -> 7", "use another --output_dir, or --overwrite_output_dir"):
        assert line in err, err
    assert main(changed + ["--overwrite_output_dir"]) == 0


def test_the_cpu_demo_is_not_continued_under_the_defaults_of_a_model_run(tmp_path, monkeypatch, capsys):
    """--model on the CPU means the defaults of a full run (1024 tokens, effective batch 8, epochs; for the packaged
    model its own lr), not the CPU demo's: a rerun of the demo's folder with --model is refused, naming what the
    defaults changed."""
    from sparse_adamw.pipeline.finetune_config import inspect_output_dir, result_config, schedule_of
    from sparse_adamw.pipeline.run_folder import RECORD_FORMAT, RUN_CONFIG

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo = _resolve([])
    inspect_output_dir(demo)
    out = tmp_path / demo.training["output_dir"]
    small_checkpoint(out, 10, max_steps=40)
    (out / RUN_CONFIG).write_text(json.dumps({"format": RECORD_FORMAT, "config": result_config(demo),
                                              "schedule": schedule_of(demo.training), "fingerprint": {}}))
    assert (tmp_path / parse_arguments([]).resume_from) == out / "checkpoint-10"  # the demo itself resumes
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--model", demo.args.model])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for line in ("  block_size: 256 -> 1024", "  effective_batch_size: 4 -> 8", "  max_steps: 40 -> -1"):
        assert line in err, err


def test_clear_errors(tiny, tmp_path, tiny_llama, capsys):
    model_dir, masks, corpus = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run_args(tmp_path / "missing", corpus, tmp_path / "o"))
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    # The masks of the 2-layer model given to a 1-layer one.
    other, _ = pruned_tiny_model(tmp_path / "other", lambda: tiny_llama(num_hidden_layers=1))
    assert main(tiny_run_args(other, corpus, tmp_path / "o", "--masks_file", model_dir / MASKS_FILE)) == 2
    assert "does not have" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tiny, tmp_path):
    """Checkpoints every step (the Trainer keeps 2), so the resumed run deletes the one it resumed from: it used to
    crash at the end reading it. The report's train_loss is the whole run's; this_process says what this one ran."""
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    args = tiny_run_args(model_dir, corpus, out, "--max_steps", 100000, "--skip_eval", "--logging_steps", 1,
                         "--save_steps", 1)
    run = Finetune(args)
    run.wait_for("Step 2:")
    run.send(signal.SIGINT)
    assert run.finish(timeout=120) == 130, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    stopped = int(re.search(r"Interrupted at step (\d+): checkpoint saved", run.stdout).group(1))
    checkpoint = out / f"checkpoint-{stopped}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    assert not (out / "model.safetensors").exists()  # no final model from an interrupted run

    args[args.index("100000")] = str(stopped + 2)
    done = run_finetune(args, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Resuming from {checkpoint}" in done.stdout
    assert [s for s, _ in _losses(done.stdout)] == [stopped + 1, stopped + 2]
    report = json.loads((out / "finetune_report.json").read_text())
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == report["steps"] == stopped + 2
    assert report["train_loss"] == pytest.approx(math.fsum(losses) / len(losses), rel=1e-12)
    assert report["this_process"]["first_step"] == stopped + 1 and report["this_process"]["last_step"] == stopped + 2
    assert report["this_process"]["train_loss"] == pytest.approx(sum(losses[-2:]) / 2, rel=1e-6)


def _interrupted_run(model_dir, corpus, out, *extra):
    """A run stopped by Ctrl+C soon after its second step (at the end of the step it is in): that step."""
    run = Finetune(tiny_run_args(model_dir, corpus, out, "--max_steps", 100000, "--skip_eval", "--logging_steps", 1,
                                 *extra))
    run.wait_for("Step 2:")
    run.send(signal.SIGINT)
    assert run.finish() == 130, run.stdout + run.stderr
    return int(re.search(r"Interrupted at step (\d+): checkpoint saved", run.stdout).group(1))


def test_a_rerun_resumes_from_the_newest_usable_checkpoint(tiny, tmp_path, capsys):
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    stopped = _interrupted_run(model_dir, corpus, out, "--save_steps", 1, "--save_total_limit", 2)
    newest = out / f"checkpoint-{stopped}"
    _truncate(newest / "optimizer.pt")
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", stopped + 1, "--skip_eval", "--logging_steps",
                              1, "--save_steps", 1, "--save_total_limit", 2)) == 0
    captured = capsys.readouterr()
    assert f"Resuming from {out / f'checkpoint-{stopped - 1}'}" in captured.out
    assert f"skipping the damaged checkpoint {newest}: optimizer.pt does not load" in captured.err
    assert [s for s, _ in _losses(captured.out)] == [stopped, stopped + 1]


def test_a_checkpoint_of_other_weights_or_masks_is_refused(tiny, tmp_path, tiny_llama, capsys):
    """The same paths, other contents: another magnitude pruning of another model of the same architecture, or
    other masks in the same file. Their checkpoint used to be adopted silently (its weights and masks winning)."""
    model_dir, masks, corpus = tiny
    out, masks_file = tmp_path / "finetuned", model_dir / MASKS_FILE
    stopped = _interrupted_run(model_dir, corpus, out, "--masks_file", masks_file)
    rerun = tiny_run_args(model_dir, corpus, out, "--max_steps", stopped + 2, "--skip_eval", "--masks_file",
                          masks_file)
    name = next(iter(masks))
    other = dict(masks, **{name: masks[name].clone()})
    other[name][(~other[name]).nonzero()[0].tolist()] = True  # a pruned block declared live: still true of W
    save_masks(masks_file, other, 16)
    assert main(rerun) == 2
    err = capsys.readouterr().err
    assert "started from other weights or masks" in err and f"  masks: {MASKS_FILE} (sha256 " in err, err
    assert "use another --output_dir, or --overwrite_output_dir" in err
    pruned_tiny_model(model_dir, lambda: tiny_llama(seed=1))
    assert main(rerun) == 2
    assert "  weights: model.safetensors (sha256 " in capsys.readouterr().err


def test_block_masks_next_to_the_model_bring_their_block_shape(tmp_path, tiny_llama, capsys):
    """Pruned in 7x5 blocks, fine-tuned with the default --prune_block: the prune step's block_masks.pt is used
    (it used to train with no masks at all, "Masks checked: 0 weights"); without it, the run is refused."""
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, block=(7, 5))
    corpus = learnable_corpus(tmp_path / "corpus.txt")
    weights = {n: p for n, p in tiny_llama().named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    expected = sum(int((~expand_block_mask(masks[n], w.shape, (7, 5))).sum()) for n, w in weights.items()) / sum(
        w.numel() for w in weights.values())
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "out", "--max_steps", 2, "--skip_eval")) == 0
    text = capsys.readouterr().out
    assert f"Block masks: {model_dir / MASKS_FILE} (the prune step's, {len(masks)} weights in 7x5 blocks)" in text
    assert f"Masks checked: {len(masks)} weights" in text
    assert re.search(rf"^Pruned 7x5 blocks\s+{expected:.4f}\s+{expected:.4f}$", text, re.M), text
    report = json.loads((tmp_path / "out" / "finetune_report.json").read_text())
    assert report["pruned_block_fraction"] == {"before": expected, "after": expected}
    (model_dir / MASKS_FILE).unlink()
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "out2", "--max_steps", 2, "--skip_eval")) == 2
    assert "was it pruned in another block shape? Pass the prune step's --prune_block" in capsys.readouterr().err
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "out3", "--max_steps", 2, "--skip_eval",
                              "--prune_block", "7x5")) == 0
    assert re.search(rf"^Pruned 7x5 blocks\s+{expected:.4f}\s+{expected:.4f}$", capsys.readouterr().out, re.M)


PHASES = {  # the test hook's pause point -> (the phase the message names, whether the final model is in place)
    "load": ("loading the model and data", False),
    "eval_before": ("evaluating the pruned model", False),
    "install": ("saving the fine-tuned model", False),  # written to the staging folder, not yet renamed into place
    "eval_after": ("evaluating the fine-tuned model", True),
    "report": ("writing the report", True),
    "cleanup": ("deleting the checkpoints", True),
}


def _phase_args(tiny, out):
    model_dir, _, corpus = tiny
    return tiny_run_args(model_dir, corpus, out, "--max_steps", 4, "--save_steps", 2, "--max_eval_windows", 4)


def _nothing_half_written(out, point, masks):
    from safetensors.torch import load_file

    json.loads((out / "run_config.json").read_text())
    final = PHASES[point][1]
    assert not list(out.glob("*.tmp")) and (out / "model.safetensors").is_file() == final, point
    assert (out / "finetune_report.json").is_file() == (point == "cleanup"), point
    if final:
        weights = load_file(out / "model.safetensors")
        assert all(pruned_blocks_are_zero(weights[name], mask) for name, mask in masks.items())


@pytest.mark.parametrize("point", PHASES)
def test_ctrl_c_in_any_phase_exits_130_with_nothing_half_written(tiny, tmp_path, capsys, monkeypatch, point):
    """KeyboardInterrupt (what Ctrl+C raises) at a point in each phase outside the training loop: exit 130 with one
    line, every file in the output folder whole or absent; the same command then completes, or says the run is
    complete. The end of training writes no checkpoint: stopped before the fine-tuned model is in place, the rerun
    trains again from the last checkpoint (step 2); once it is in place, it finishes from it without training."""
    import sparse_adamw.pipeline.finetune as finetune

    def ctrl_c_at(here):
        if here == point:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(finetune, "_pause_here", ctrl_c_at)
    try:
        assert main(_phase_args(tiny, out)) == 130
    except KeyboardInterrupt:  # uncaught, it would end the whole test session
        pytest.fail(f"KeyboardInterrupt at {point} escaped main()")
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"Interrupted while {PHASES[point][0]}; rerun the same command to resume"
    _nothing_half_written(out, point, tiny[1])
    monkeypatch.undo()
    assert main(_phase_args(tiny, out)) == 0
    expected = {"load": "Step 4:", "eval_before": "Step 4:", "install": f"Resuming from {out / 'checkpoint-2'}",
                "cleanup": "This run is already complete (4 steps)"}.get(
        point, f"{out} holds the fine-tuned model of all 4 steps: finishing the run from it")
    assert expected in capsys.readouterr().out
    assert json.loads((out / "finetune_report.json").read_text())["steps"] == 4


class _SigintFromAnotherThread:
    """A thread started before the run, so that SIGINT is open in it, that sends itself SIGINT on send(): as the
    kernel hands a process-wide Ctrl+C to any thread that does not block it (a fine-tune has several: tqdm's
    monitor, the math libraries' workers), and CPython then raises KeyboardInterrupt in the main thread. send()
    returns once the signal has been delivered."""

    def __init__(self):
        self._go, self._done = threading.Event(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        if self._go.wait(timeout=600):
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            self._done.set()

    def send(self):
        self._go.set()
        assert self._done.wait(timeout=60), "the signalling thread did not signal itself"


@pytest.mark.parametrize("to", ["the renaming thread", "another thread"])
def test_ctrl_c_between_the_renames_of_the_final_model_waits_until_every_file_is_in_place(tiny, tmp_path, capsys,
                                                                                           monkeypatch, to):
    """The final model is renamed from the staging folder into the output folder file by file, with SIGINT and
    SIGTERM held back (final_model.signals_held_back). A real SIGINT right after the first of those renames, delivered to the
    thread doing them or taken by another: every file the staging folder held still arrives, byte for byte (the
    safetensors loads, its pruned blocks zero), and only then does the interrupt end the run (exit 130, one line);
    without the hold, the run stopped with one file of the model in place and the rest left behind."""
    import hashlib
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    from sparse_adamw.pipeline.run_folder import STAGING

    model_dir, masks, corpus = tiny
    out = tmp_path / "out"
    staging = (out / STAGING).resolve()
    real_replace = os.replace
    staged, moved = {}, []
    if to == "another thread":
        send = _SigintFromAnotherThread().send
    else:
        def send():
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    def replace(src, dst, *args, **kwargs):
        into_place = Path(src).resolve().parent == staging and Path(dst).resolve().parent == out.resolve()
        if into_place and not moved:  # the staging folder as the renames find it, before the first
            staged.update({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                           for f in staging.iterdir() if f.is_file()})
        real_replace(src, dst, *args, **kwargs)
        if into_place:
            moved.append(Path(dst).name)
            if len(moved) == 1:
                send()  # a Ctrl+C between two renames

    monkeypatch.setattr(os, "replace", replace)
    # Python's own handler, so that the signal raises KeyboardInterrupt even where the test process ignores SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval"))
    except KeyboardInterrupt:  # uncaught, it would end the whole test session
        pytest.fail("the SIGINT escaped main()")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "Interrupted while saving the fine-tuned model; rerun the same command to resume")
    expected = set(staged) - {"training_args.bin"}  # install() leaves it out: run_config.json says it all
    assert {"model.safetensors", "config.json", MASKS_FILE} <= expected and moved, (staged, moved)
    assert sorted(moved) == sorted(expected), f"the interrupt stopped the renames after {moved}"
    for name in expected:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == staged[name], f"{name} is not whole"
    weights = load_file(out / "model.safetensors")
    assert all(pruned_blocks_are_zero(weights[name], mask) for name, mask in masks.items())
    assert not (out / "finetune_report.json").exists()  # the interrupt came before the report


def _real_signal_outside_training(tiny, tmp_path, sig):
    """Subprocesses paused by SPARSE_ADAMW_TEST_PAUSE, one while evaluating and one between writing the final model
    and renaming it into place, each sent `sig`: exit 130 within a minute, one last line naming the phase, no
    traceback, nothing half-written."""
    runs = {point: Finetune(_phase_args(tiny, tmp_path / point), SPARSE_ADAMW_TEST_PAUSE=point)
            for point in ("eval_before", "install")}
    for point, run in runs.items():
        run.wait_for(f"[SPARSE_ADAMW_TEST_PAUSE] paused at {point}", timeout=240)
        run.send(sig)
    for point, run in runs.items():
        assert run.finish(timeout=60) == 130, run.stdout + run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1] == (f"Interrupted while {PHASES[point][0]}; rerun the same "
                                                       "command to resume")
        _nothing_half_written(tmp_path / point, point, tiny[1])


def test_a_real_ctrl_c_outside_training_exits_130_with_one_line(tiny, tmp_path):
    """The same with real signals, in subprocesses paused by SPARSE_ADAMW_TEST_PAUSE: while evaluating, and between
    writing the final model and renaming it into place."""
    _real_signal_outside_training(tiny, tmp_path, signal.SIGINT)


def test_a_real_ctrl_c_reaches_the_run_when_the_tests_ignore_sigint(tiny, tmp_path):
    """Run from a background job of a non-interactive shell, the test process ignores SIGINT, and a child inherits
    SIG_IGN through exec: its Python then never installs the KeyboardInterrupt handler, the Ctrl+C above is lost and
    the test used to wait forever on the paused run. The helper starts its children with SIGINT at its default
    whatever this process's disposition, so the run still exits 130 with its one line (and a wait would give up
    at its deadline rather than hang)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _real_signal_outside_training(tiny, tmp_path, signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_real_sigterm_outside_training_exits_130_with_one_line(tiny, tmp_path):
    """SIGTERM (a batch scheduler's) outside the training loop ends the run as Ctrl+C does: main() turns it into
    KeyboardInterrupt (_sigterm_as_ctrl_c). Without that handler SIGTERM's default would end the process at once,
    status -15, with no line saying what to do. Training's own SIGTERM handling is tested in
    test_interrupted_and_killed_runs_end_bitwise_equal_to_an_uninterrupted_one."""
    _real_signal_outside_training(tiny, tmp_path, signal.SIGTERM)


@pytest.mark.parametrize("distill, data_parallel, lora", [(False, "ddp", False), (True, "ddp", False),
                                                          (False, "sharded", False), (True, "ddp", True)],
                         ids=["lm", "distilled", "sharded", "lora_distilled"])
def test_two_processes_through_torchrun_match_one_process(tiny, tmp_path, tiny_llama, distill, data_parallel, lora):
    """DDP over gloo, 2 processes x accumulation 2 against 1 process x accumulation 4: the same 4 sequences per
    step (accelerate deals the sampler's batches out round-robin), so the losses agree to fp32 summation order.
    Distilled, each rank holds its own teacher and the loss is normalized over both ranks' tokens. The sharded step
    (ShardedSparseAdamW over gloo) the same way, through the whole command: the final model saved from its buffer.
    Masked LoRA (--lora, no dropout), distilled with the teacher's weights shared, the same way: its merged model.

    Tolerance: the two runs differ only in how the gradient sums are associated (two half-sums all-reduced
    against one running sum), a relative difference of ~1e-7 per step that Adam carries forward; 1e-4 relative on
    the logged loss and 1e-5 absolute on the weights leave two orders of magnitude of headroom.
    """
    model_dir, masks, corpus = tiny
    common = ["--max_steps", 6, "--skip_eval", "--logging_steps", 1, "--max_train_samples", 64]
    if lora:
        common += ["--lora", "--lora_dropout", 0]
    if distill:
        from pipeline_helpers import save_tiny_model, tiny_tokenizer

        # --lora: the dense parent (tiny_llama's seed 0, which the fixture pruned), whose weights the student shares
        teacher = tiny_llama(seed=0 if lora else 1)
        common += ["--teacher", save_tiny_model(tmp_path / "teacher", teacher, tiny_tokenizer()),
                   "--distill_alpha", 0.7]
    single = subprocess.run(
        [sys.executable, "-m", "sparse_adamw.pipeline.finetune",
         *tiny_run_args(model_dir, corpus, tmp_path / "one", *common, "--gradient_accumulation_steps", 4)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sparse_adamw.pipeline.finetune",
         *tiny_run_args(model_dir, corpus, tmp_path / "two", *common, "--gradient_accumulation_steps", 2,
                        "--data_parallel", data_parallel)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "effective batch 4 (1 x 2 process(es) x 2)" in ddp.stdout
    assert f"Data parallel: {'sharded step' if data_parallel == 'sharded' else 'DDP'}" in ddp.stdout
    report = json.loads((tmp_path / "two" / "finetune_report.json").read_text())
    assert report["data_parallel"] == data_parallel
    assert (report["sharded_step_buffer_bytes"] or 0) > 0 if data_parallel == "sharded" else (
        report["sharded_step_buffer_bytes"] is None)
    assert ("Distillation: 0.7 x KL" in ddp.stdout) == distill
    assert ("share one copy of the dense weights" in ddp.stdout) == lora
    one, two = _losses(single.stdout), _losses(ddp.stdout)
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (step, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * a, f"step {step}: loss {a} (1 process) vs {b} (2 processes)"

    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(w2[name], mask), f"{name}: DDP made a pruned block nonzero"
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= 1e-5, f"weights differ by up to {worst}"


# ---------------------------------------------------------------------------------------- fault injection
REPORT_DETERMINISTIC = ("steps", "train_loss", "perplexity", "sparsity", "pruned_block_fraction",
                        "effective_batch_size", "block_size", "learning_rate", "world_size", "device", "dtype",
                        "bf16_autocast", "fsdp", "configuration")


def test_interrupted_and_killed_runs_end_bitwise_equal_to_an_uninterrupted_one(tiny, tmp_path):
    """The fault-injection promise: Ctrl+C at one step, SIGTERM (a batch scheduler's) two steps into the rerun, kill -9
    as a later checkpoint's step line appears (its save follows that line at once), then the same command again: the
    final weights are bitwise those of a run never interrupted, and so are the report's deterministic fields (logging
    every step, so that the whole run's mean loss adds the same per-step losses in the same order)."""
    from safetensors.torch import load_file

    model_dir, masks, corpus = tiny

    def args(out):
        return tiny_run_args(model_dir, corpus, out, "--max_steps", 16, "--save_steps", 2, "--logging_steps", 1,
                             "--max_eval_windows", 4)

    whole = Finetune(args(tmp_path / "whole"))  # alongside the interrupted ones
    out, stopped = tmp_path / "interrupted", 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = Finetune(args(out))
        run.wait_for_step(lambda step: step >= stopped + 2)
        run.send(sig)
        assert run.finish() == 130, run.stdout + run.stderr
        stopped = int(re.search(r"^Interrupted at step (\d+): checkpoint saved", run.stdout, re.M).group(1))
    run = Finetune(args(out))
    killed = run.wait_for_step(lambda step: step >= stopped + 2 and step % 2 == 0)
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL and killed < 16
    done = run_finetune(args(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert "Resuming from" in done.stdout
    assert whole.finish() == 0, whole.stdout + whole.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the interruptions"
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(b[name], mask), f"{name}: a pruned block is nonzero"
    reports = [json.loads((d / "finetune_report.json").read_text()) for d in (tmp_path / "whole", out)]
    for key in REPORT_DETERMINISTIC:
        assert reports[0][key] == reports[1][key], key
    assert reports[1]["resumed_from"] and reports[1]["this_process"]["last_step"] == 16


def test_whole_run_loss_weighs_each_log_by_the_steps_it_covers():
    from sparse_adamw.pipeline.results import whole_run_loss

    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 1.0, "step": 3},
               {"loss": 2.0, "step": 6}, {"train_loss": 7.0, "step": 6}]
    assert whole_run_loss(history) == (4.0 * 2 + 1.0 + 2.0 * 3) / 6
    assert whole_run_loss(history, after=3) == 2.0 and whole_run_loss(history, after=6) is None
    assert whole_run_loss([]) is None


def test_two_nodes_through_the_script_match_one_node_with_two_processes(tiny, tmp_path):
    """run_dense_finetune.sh --nnodes 2: two "machines" of one process each on localhost (gloo), launched as a user
    would launch them, one per node, train exactly like one machine with two processes: the same world size and
    gradient accumulation, so the same batches and the same sums."""
    _two_nodes_through_the_script(tiny, tmp_path, per_node=1)


def test_two_nodes_of_two_processes_through_the_script_match_one_node_with_four(tiny, tmp_path):
    """The same with 2 processes per node: 2 nodes x 2 processes through the script train exactly like one machine
    with 4 processes (ranks 0, 1 on node 0 and 2, 3 on node 1: each gets the batches of the same rank there). Without
    a GPU the script runs one process per node, so the node is given 2 GPUs by an nvidia-smi on PATH that lists them
    (as test_run_script.py fakes them): the script starts torchrun with --nproc_per_node 2, and the run itself stays
    on the CPU (--use_cpu; this PyTorch cannot use CUDA, as the script warns)."""
    _two_nodes_through_the_script(tiny, tmp_path, per_node=2)


def _two_nodes_through_the_script(tiny, tmp_path, per_node):
    import os
    import socket

    from finetune_helpers import REPO

    model_dir, masks, corpus = tiny
    common = ["--max_steps", 4, "--skip_eval", "--logging_steps", 1, "--max_train_samples", 64,
              "--gradient_accumulation_steps", 2]
    one = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(2 * per_node),
         "-m", "sparse_adamw.pipeline.finetune", *tiny_run_args(model_dir, corpus, tmp_path / "one", *common)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    env, gpus = subprocess_env(), []
    if per_node > 1:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "nvidia-smi").write_text("#!/usr/bin/env bash\n" + "".join(f'echo "{i}, 81000"\n'
                                                                           for i in range(per_node)))
        (fake / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
        gpus = ["--num_gpus", per_node]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [Child(["bash", REPO / "run_dense_finetune.sh", *gpus, "--nnodes", "2", "--node_rank", rank,
                    "--master_addr", "127.0.0.1", "--master_port", port,
                    *tiny_run_args(model_dir, corpus, tmp_path / "two", *common)],
                   env=env, cwd=tmp_path)
             for rank in (0, 1)]
    for node in nodes:
        assert node.finish(timeout=300) == 0, node.stdout + node.stderr
    outs = [(node.stdout, node.stderr) for node in nodes]
    assert (f"Nodes: 2 x {per_node} process(es) = {2 * per_node} in all; this is node 0, meeting at 127.0.0.1:"
            in outs[0][0])
    assert "this is node 1" in outs[1][0] and "Gradient accumulation: 2" in outs[1][0]
    for out, _ in outs:
        assert f"--nproc_per_node {per_node} -m sparse_adamw.pipeline.finetune" in out
        if per_node > 1:  # the listed GPUs are not used
            assert "the training runs on the CPU" in out
    assert f"effective batch {4 * per_node} (1 x {2 * per_node} process(es) x 2)" in one.stdout
    assert f"effective batch {4 * per_node} (1 x {2 * per_node} process(es) x 2)" in outs[0][0]
    single_node, two_nodes = _losses(one.stdout), _losses(outs[0][0])
    assert [s for s, _ in two_nodes] == list(range(1, 5))
    assert two_nodes == single_node
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(w1) == set(w2)
    for name in w1:  # the same ranks and the same all-reduces, wherever the ranks run
        assert torch.equal(w1[name], w2[name]), f"{name}: the two nodes' weights differ from one node's"
