"""Signals in a subprocess, as a terminal or a batch scheduler sends them.

A second Ctrl+C (or SIGTERM) while the first one's checkpoint is being saved: the process stops at once with status
130 and one line on stderr, no traceback, and the half-written checkpoint stays in its staging folder,
.tmp-checkpoint-2, never renamed to checkpoint-2 (so a resume cannot take it; the next run removes it). The script
sends the first signal at the end of step 2 and the second from inside the checkpoint's write, after the model is
written and before the optimizer state is.

Ctrl+C in a terminal sends SIGINT to the whole foreground process group, the DataLoader's workers included: they
inherit the handler when they are forked, keep working, and only the training process says anything and checkpoints.
"""
import sys
import textwrap

import pytest

from finetune_helpers import REPO, Child, subprocess_env

SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
    from finetune_helpers import ArithmeticTokens
    from sparse_adamw.pipeline.prune import prune_magnitude
    from sparse_adamw.pipeline.trainer import SparseTrainer, TrainingAborted

    sig, output_dir, mode = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[4]


    class FirstSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                if mode == "group":
                    os.killpg(os.getpgrp(), sig)  # this process and its DataLoader workers, as Ctrl+C does
                else:
                    os.kill(os.getpid(), sig)


    from sparse_adamw.pipeline import checkpoints

    save_torch = checkpoints._save_torch

    def second_signal_before_the_optimizer_state(obj, path):
        if mode == "second":
            os.kill(os.getpid(), sig)  # the handler runs before the next line
            time.sleep(30)
        return save_torch(obj, path)

    checkpoints._save_torch = second_signal_before_the_optimizer_state


    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    prune_magnitude(model, 0.25, progress=False)
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=8, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
                             dataloader_num_workers=2 if mode == "group" else 0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=ArithmeticTokens(), callbacks=[FirstSignal()])
    try:
        trainer.train()
    except TrainingAborted as err:  # what sparse_adamw.pipeline.finetune.main does
        print(err, file=sys.stderr, flush=True)
        sys.exit(err.exit_status)
    print(f"training finished: interrupted={trainer.interrupted} at step {trainer.state.global_step}", flush=True)
''')


def _run(tmp_path, signame, mode):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    output_dir = tmp_path / "out"
    # Child: a session of its own (a signal to the script's process group reaches nothing else), SIGINT and SIGTERM
    # at their defaults even where this process ignores them, and a deadline.
    run = Child([sys.executable, script, signame, output_dir, REPO, mode], env=subprocess_env())
    run.finish(timeout=300)
    return run, output_dir


@pytest.mark.parametrize("signame, name", [("SIGINT", "Ctrl+C"), ("SIGTERM", "SIGTERM")])
def test_a_second_signal_during_the_save_exits_130_with_one_line(tmp_path, signame, name):
    run, output_dir = _run(tmp_path, signame, "second")
    assert run.returncode == 130, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "training finished" not in run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    aborted = f"Second {name}: stopped without finishing the checkpoint; the last complete checkpoint is kept"
    assert lines[-1] == aborted and lines.count(aborted) == 1, lines[-5:]
    assert f"{name}: saving a checkpoint at the end of this step, then stopping" in run.stderr
    staging = output_dir / ".tmp-checkpoint-2"
    assert (staging / "model.safetensors").is_file()  # half written: the model, then the second signal
    assert not (staging / "optimizer.pt").exists() and not (output_dir / "checkpoint-2").exists()


def test_ctrl_c_to_the_process_group_spares_the_dataloader_workers(tmp_path):
    run, output_dir = _run(tmp_path, "SIGINT", "group")
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    assert "training finished: interrupted=True at step 2" in run.stdout, run.stdout[-2000:]
    assert run.stderr.count("Ctrl+C: saving a checkpoint") == 1, run.stderr[-3000:]
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
