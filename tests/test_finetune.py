"""python -m sparse_adamw.pipeline.finetune: defaults, a short run on a tiny model, another block shape, resume,
Ctrl+C, DDP through torchrun."""
import json
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from finetune_helpers import (
    learnable_corpus,
    pruned_blocks_are_zero,
    pruned_tiny_model,
    subprocess_env,
    tiny_run_args,
)
from sparse_adamw.pipeline.cli import CPU_BLOCK_SIZE
from sparse_adamw.pipeline.finetune import (
    build_parser,
    format_lr,
    gradient_accumulation_for,
    last_checkpoint,
    main,
    resolve_arguments,
    _split,
)
from sparse_adamw.masks import MASKS_FILE, expand_block_mask, load_masks

STEP_LINE = re.compile(r"^Step (\d+): loss=(\d+\.\d{4})\b", re.M)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path, tiny_llama):
    """(pruned model dir, its masks, a learnable corpus)."""
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)
    return model_dir, masks, learnable_corpus(tmp_path / "corpus.txt")


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
    assert t["output_dir"] == "out/llama2_7b/block_16x16_20sparsity/wanda/dense_finetuned_model"
    assert (t["logging_steps"], t["save_steps"]) == (10, 500)
    assert not plan.cpu_default and plan.resume_from is None
    with pytest.raises(ValueError, match="1, 2, 4 or 8 GPUs"):
        _resolve(["--model", model], cuda=True, world_size=3)
    # An explicit accumulation is kept (and then any number of processes goes).
    assert _resolve(["--model", model, "--gradient_accumulation_steps", "3"], cuda=True,
                    world_size=3).effective_batch_size == 9


def test_cpu_offline_default_is_cpu_sized():
    plan = _resolve([])
    t, a = plan.training, plan.args
    assert plan.cpu_default and plan.on_cpu
    assert a.model == "out/smollm2-135m/block_16x16_20sparsity/wanda/pruned_model"
    assert t["output_dir"] == "out/smollm2-135m/block_16x16_20sparsity/wanda/dense_finetuned_model"
    assert (a.block_size, a.max_eval_windows, a.dtype) == (CPU_BLOCK_SIZE, 16, "float32")
    assert (t["max_steps"], t["learning_rate"], t["gradient_accumulation_steps"]) == (40, 1e-4, 4)
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
    assert values["OUTPUT_DIR"] == "x/dense_finetuned_model"
    assert (values["GRADIENT_ACCUMULATION"], values["EFFECTIVE_BATCH"], values["LEARNING_RATE"]) == ("2", "8", "5e-5")
    assert format_lr(1e-4) == "1e-4" and format_lr(2.5e-5) == "2.5e-5"


def test_last_checkpoint_skips_an_incomplete_one(tmp_path, capsys):
    assert last_checkpoint(tmp_path) is None
    for step in (5, 10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "incomplete checkpoint" in capsys.readouterr().err


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
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 12, "--max_eval_windows", 8)) == 0
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
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 4, "--save_steps", 2, "--skip_eval")) == 0
    capsys.readouterr()
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 6, "--save_steps", 2, "--skip_eval")) == 0
    text = capsys.readouterr().out
    assert f"Resuming from {out / 'checkpoint-4'}" in text
    assert [s for s, _ in _losses(text)] == [6]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    # --overwrite_output_dir starts afresh.
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--skip_eval", "--overwrite_output_dir")) == 0
    text = capsys.readouterr().out
    assert "Resuming" not in text and [s for s, _ in _losses(text)] == [2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_clear_errors(tiny, tmp_path, tiny_llama, capsys):
    model_dir, masks, corpus = tiny
    assert main(tiny_run_args(tmp_path / "missing", corpus, tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    # The masks of the 2-layer model given to a 1-layer one.
    other, _ = pruned_tiny_model(tmp_path / "other", lambda: tiny_llama(num_hidden_layers=1))
    assert main(tiny_run_args(other, corpus, tmp_path / "o", "--masks_file", model_dir / MASKS_FILE)) == 2
    assert "does not have" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tiny, tmp_path):
    model_dir, _, corpus = tiny
    out = tmp_path / "finetuned"
    command = [sys.executable, "-m", "sparse_adamw.pipeline.finetune",
               *tiny_run_args(model_dir, corpus, out, "--max_steps", 100000, "--skip_eval", "--logging_steps", 1)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Step 2:"):
            proc.send_signal(signal.SIGINT)
    text = "".join(lines)
    assert proc.wait(timeout=120) == 130, text
    assert "Traceback" not in text, text
    stopped = int(re.search(r"Interrupted at step (\d+): checkpoint saved", text).group(1))
    checkpoint = out / f"checkpoint-{stopped}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    assert not (out / "model.safetensors").exists()  # no final model from an interrupted run

    command[command.index("100000")] = str(stopped + 2)
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Resuming from {checkpoint}" in done.stdout
    assert [s for s, _ in _losses(done.stdout)] == [stopped + 1, stopped + 2]


def test_two_processes_through_torchrun_match_one_process(tiny, tmp_path):
    """DDP over gloo, 2 processes x accumulation 2 against 1 process x accumulation 4: the same 4 sequences per
    step (accelerate deals the sampler's batches out round-robin), so the losses agree to fp32 summation order.

    Tolerance: the two runs differ only in how the gradient sums are associated (two half-sums all-reduced
    against one running sum), a relative difference of ~1e-7 per step that Adam carries forward; 1e-4 relative on
    the logged loss and 1e-5 absolute on the weights leave two orders of magnitude of headroom.
    """
    model_dir, masks, corpus = tiny
    common = ["--max_steps", 6, "--skip_eval", "--logging_steps", 1, "--max_train_samples", 64]
    single = subprocess.run(
        [sys.executable, "-m", "sparse_adamw.pipeline.finetune",
         *tiny_run_args(model_dir, corpus, tmp_path / "one", *common, "--gradient_accumulation_steps", 4)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sparse_adamw.pipeline.finetune",
         *tiny_run_args(model_dir, corpus, tmp_path / "two", *common, "--gradient_accumulation_steps", 2)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "effective batch 4 (1 x 2 process(es) x 2)" in ddp.stdout
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
