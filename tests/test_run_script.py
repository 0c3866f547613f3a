"""run_dense_finetune.sh: help, GPU choice, gradient accumulation, banner, memory prompt, CPU run.

GPUs are faked by an `nvidia-smi` on PATH that prints `index, free MB` lines; most runs use --dry_run, which
stops right before the launch.
"""
import os
import re
import subprocess

import pytest

from finetune_helpers import REPO, learnable_corpus, pruned_tiny_model, subprocess_env

SCRIPT = REPO / "run_dense_finetune.sh"


@pytest.fixture
def fake_gpus(tmp_path):
    """run(args, gpus="0:81000,1:81000", stdin=None) -> CompletedProcess; gpus="" means no GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/usr/bin/env bash\n[[ -n "$FAKE_GPUS" ]] || exit 9\n'
                   'IFS="," read -r -a gpus <<< "$FAKE_GPUS"\n'
                   'for g in "${gpus[@]}"; do echo "${g%%:*}, ${g##*:}"; done\n')
    smi.chmod(0o755)

    def run(args, gpus="", stdin=subprocess.DEVNULL, timeout=120, **env):
        environment = subprocess_env(FAKE_GPUS=gpus, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        if "CUDA_VISIBLE_DEVICES" not in env:
            environment.pop("CUDA_VISIBLE_DEVICES", None)
        return subprocess.run(["bash", str(SCRIPT), *map(str, args)], stdin=stdin, capture_output=True, text=True,
                              env=environment, timeout=timeout, cwd=tmp_path)

    return run


def _line(text, key):
    match = re.search(rf"^\s*{re.escape(key)}: (.*)$", text, re.M)
    assert match, f"no '{key}:' line in:\n{text}"
    return match.group(1)


def test_help(fake_gpus):
    done = fake_gpus(["--help"])
    assert done.returncode == 0
    out = done.stdout
    assert out.startswith("Usage: run_dense_finetune.sh [OPTIONS] [FINETUNE ARGS]\n\nOptions:\n")
    for text in ('  --num_gpus N        Number of GPUs to use (default: 1)',
                 '  --gpu_ids "X,Y"     Comma-separated GPU IDs', '  --yes', '  -h, --help          Show this help message',
                 "Examples:", "  Single GPU (default):     ./run_dense_finetune.sh\n",
                 '  Dual GPU (GPU 2,3):       ./run_dense_finetune.sh --num_gpus 2 --gpu_ids "2,3"',
                 '  Quad GPU (GPU 0-3):       ./run_dense_finetune.sh --num_gpus 4 --gpu_ids "0,1,2,3"',
                 "1 GPU -> 8, 2 GPUs -> 4, 4 GPUs -> 2", "Performance:"):
        assert text in out, text
    assert fake_gpus(["-h"]).stdout == out


@pytest.mark.parametrize("num_gpus, accumulation", [(1, 8), (2, 4), (4, 2)])
def test_gradient_accumulation_keeps_the_effective_batch_at_8(fake_gpus, num_gpus, accumulation):
    done = fake_gpus(["--num_gpus", num_gpus, "--dry_run", "--model", "m/pruned_model", "--max_steps", 5],
                     gpus="0:81000,1:81000,2:81000,3:81000")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rule = "=" * 42
    assert out.startswith(f"{rule}\nDense Fine-tuning Configuration\n{rule}\nMethod: Full fine-tuning with SparseTrainer")
    assert _line(out, "Pruned model") == "m/pruned_model (not found here)"
    assert _line(out, "Output directory") == "m/dense_finetuned_model"
    assert _line(out, "Number of GPUs") == str(num_gpus)
    assert _line(out, "GPU IDs") == ",".join(str(i) for i in range(num_gpus))
    assert _line(out, "Gradient accumulation") == str(accumulation)
    assert _line(out, "Effective batch size") == "8"
    for key, value in (("Number of epochs", "3"), ("Learning rate", "5e-5"), ("Per-device batch size", "1"),
                       ("Block size", "1024"), ("Max train samples", "30000")):
        assert _line(out, key) == value, key
    for section in ("\nGPU Configuration:\n", "\nTraining Parameters:\n", "🚀 Starting dense fine-tuning with SparseTrainer"):
        assert section in out
    command = _line(out, "Command")
    entry = f"-m sparse_adamw.pipeline.finetune --gradient_accumulation_steps {accumulation} --model m/pruned_model --max_steps 5"
    assert entry in command
    if num_gpus == 1:
        assert _line(out, "Training mode") == "Single-GPU" and "torch.distributed.run" not in command
    else:
        assert _line(out, "Training mode") == "Multi-GPU (torchrun)"
        assert f"-m torch.distributed.run --standalone --nproc_per_node {num_gpus} " in command
        assert f"Using multi-GPU training with torchrun ({num_gpus} GPUs)..." in out


def test_a_gpu_count_that_does_not_divide_8_is_an_error(fake_gpus):
    done = fake_gpus(["--num_gpus", 3, "--dry_run", "--model", "m"], gpus="0:81000,1:81000,2:81000,3:81000")
    assert done.returncode == 2
    assert "1, 2, 4 or 8 GPUs" in done.stderr and "Command:" not in done.stdout


def test_gpu_ids(fake_gpus):
    gpus = "0:81000,1:81000,2:81000,3:81000"
    done = fake_gpus(["--gpu_ids", "2,3", "--dry_run", "--model", "m"], gpus=gpus)
    assert done.returncode == 0, done.stderr
    assert (_line(done.stdout, "Number of GPUs"), _line(done.stdout, "GPU IDs")) == ("2", "2,3")
    assert "Training mode: 2 GPU(s) on device(s): 2,3" in done.stdout
    # The default is the first N visible GPUs.
    done = fake_gpus(["--num_gpus", 2, "--dry_run", "--model", "m"], gpus=gpus, CUDA_VISIBLE_DEVICES="3,1,0")
    assert _line(done.stdout, "GPU IDs") == "3,1"
    for args, message in ((["--num_gpus", 1, "--gpu_ids", "2,3"], "names 2 GPU(s)"),
                          (["--gpu_ids", "7"], "GPU 7 does not exist"),
                          (["--gpu_ids", "1,1"], "listed twice"),
                          (["--num_gpus", 8], "only 4 GPU(s) are visible"),
                          (["--num_gpus", "two"], "positive integer")):
        done = fake_gpus([*args, "--dry_run", "--model", "m"], gpus=gpus)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


def test_low_gpu_memory_asks_and_never_hangs_without_a_terminal(fake_gpus):
    gpus = "0:81000,1:30000"
    args = ["--num_gpus", 2, "--dry_run", "--model", "m"]
    done = fake_gpus(args, gpus=gpus)  # stdin is /dev/null: no terminal to ask
    assert done.returncode == 1
    assert "Available GPU memory: GPU 1: 30000 MB (~29 GB)" in done.stdout
    assert "⚠️  Warning: GPU memory may be insufficient!" in done.stdout
    assert "no terminal to ask: stopping. Pass --yes" in done.stderr and "Command:" not in done.stdout
    done = fake_gpus([*args, "--yes"], gpus=gpus)
    assert done.returncode == 0 and "Continue anyway? (y/n) y (--yes)" in done.stdout
    assert "Command:" in done.stdout
    assert "Warning: GPU memory" not in fake_gpus(args, gpus="0:81000,1:81000").stdout


@pytest.mark.parametrize("answer, code", [("n\n", 1), ("y\n", 0)])
def test_low_gpu_memory_prompt_on_a_terminal(fake_gpus, answer, code):
    import pty

    controller, terminal = pty.openpty()
    os.write(controller, answer.encode())
    try:
        done = fake_gpus(["--dry_run", "--model", "m"], gpus="0:30000", stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert done.returncode == code, done.stdout + done.stderr
    assert ("Aborted." in done.stdout) == (code == 1)


def test_without_a_gpu_it_runs_on_the_cpu_in_one_process(fake_gpus, tmp_path, tiny_llama):
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)
    corpus = learnable_corpus(tmp_path / "corpus.txt")
    done = fake_gpus(["--num_gpus", 2, "--model", model_dir, "--dataset_path", corpus, "--block_size", 32,
                      "--max_steps", 4, "--logging_steps", 2, "--max_eval_windows", 4, "--use_cpu"])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "No GPU found (nvidia-smi is missing or lists no GPU): running on the CPU in one process." in out
    assert "Ignoring --num_gpus/--gpu_ids on the CPU." in out
    assert _line(out, "Number of GPUs") == "0" and _line(out, "Training mode") == "CPU, one process (no GPU found)"
    assert _line(out, "Gradient accumulation") == "8" and "torch.distributed.run" not in _line(out, "Command")
    assert "*** Starting sparse full fine-tuning ***" in out and "Step 4: loss=" in out
    assert re.search(r"^Pruned 16x16 blocks\s+0\.2500\s+0\.2500$", out, re.M)
    assert (tmp_path / "dense_finetuned_model" / "model.safetensors").is_file()
