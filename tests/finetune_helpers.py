"""Shared by the fine-tuning tests: a tiny pruned LLaMA on disk, a learnable local corpus, subprocess settings, a
command in a subprocess whose every wait has a deadline (Child) and the fine-tune command so (read line by line, to
signal it at a given moment), a small checkpoint folder, a callback that logs the training losses."""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from pipeline_helpers import WORDS, save_tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


class ArithmeticTokens(torch.utils.data.Dataset):
    """Learnable sequences: each is an arithmetic progression of token ids with a per-sequence start and stride."""

    def __init__(self, n=64, seq=32, vocab=256):
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def learnable_corpus(path, n=400, seed=0):
    """Paragraphs built from six fixed 12-word sentences: a tiny model's loss drops within a few steps."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(6)]
    paragraphs = [" ".join(rng.choice(sentences) for _ in range(4)) for _ in range(n)]
    Path(path).write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def pruned_tiny_model(directory, tiny_llama, sparsity=0.25, block=(16, 16), **sizes):
    """A tiny random LLaMA (`sizes` go to the tiny_llama factory) with `sparsity` of its decoder Linear weights'
    `block` blocks zeroed, saved with its tokenizer and block_masks.pt in `directory`; returns (directory,
    {name: mask})."""
    from sparse_adamw.masks import MASKS_FILE, save_masks
    from sparse_adamw.pipeline.prune import prune_magnitude

    model = tiny_llama(**sizes)
    masks = prune_magnitude(model, sparsity, block, progress=False)
    save_tiny_model(directory, model, tiny_tokenizer())
    save_masks(Path(directory) / MASKS_FILE, masks, block)
    return Path(directory), masks


def subprocess_env(**extra):
    """Environment for the CLI in a subprocess: offline, one thread per process (tiny models run faster so,
    and two processes share two cores), this checkout on the path."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tiny_run_args(model_dir, corpus, output_dir, *extra):
    """Flags for a short fine-tune of the tiny model (sequences of 32 tokens), on the CPU even where a GPU is
    (two processes of the DDP test cannot share one GPU under NCCL)."""
    return ["--model", str(model_dir), "--dataset_path", str(corpus), "--block_size", "32", "--use_cpu",
            "--output_dir", str(output_dir), "--learning_rate", "3e-3", "--logging_steps", "2", *map(str, extra)]


FINETUNE = [sys.executable, "-m", "sparse_adamw.pipeline.finetune"]


def run_finetune(args, timeout=300, **env):
    """The fine-tune command with `args`, run to its end in a subprocess (CompletedProcess, text)."""
    return subprocess.run(FINETUNE + [str(a) for a in args], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout)


def _default_signals():
    """In the child, before it execs: SIGINT and SIGTERM at their default dispositions and unblocked. A disposition
    of SIG_IGN survives exec (a test run from a background job of a non-interactive shell ignores SIGINT), and a
    Python started with SIGINT ignored never installs its KeyboardInterrupt handler: a test's Ctrl+C would not
    reach it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


class Child:
    """A command in a subprocess of its own session (a signal a test sends reaches it and nothing else; a timeout
    kills its whole process group), with SIGINT and SIGTERM at their defaults whatever this process's are (see
    _default_signals). Its stdout is read line by line on a thread into a queue, its stderr goes to a file, so that
    neither pipe can fill up and stall it. Every wait has a deadline: past it, the child is killed and the wait
    fails with an AssertionError that shows what the child printed so far."""

    running = set()  # children not yet waited for: conftest kills what a failing test left behind

    def __init__(self, command, env=None, cwd=None):
        self.command = [str(c) for c in command]
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, encoding="utf-8", errors="replace", env=env,
                                     cwd=cwd, start_new_session=True, preexec_fn=_default_signals)
        Child.running.add(self)
        self.lines = []
        self._queue = queue.Queue()
        self._ended = False  # stdout reached its end
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                self._queue.put(line)
        finally:
            self._queue.put(None)

    def _next_line(self, deadline, waiting_for):
        """The next line of stdout, None at its end; past `deadline` (time.monotonic()), kill and fail."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._give_up(waiting_for)
        if line is None:
            self._ended = True
        else:
            self.lines.append(line)
        return line

    def _give_up(self, waiting_for):
        self.kill()
        raise AssertionError(f"gave up waiting for {waiting_for}: killed {' '.join(self.command)}\n"
                             f"--- its stdout (tail):\n{self.stdout[-4000:]}\n--- its stderr (tail):\n"
                             f"{self.stderr[-4000:]}") from None

    def wait_for(self, prefix, timeout=300):
        """Read stdout up to the first line that starts with `prefix` and return it."""
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline, f"a line starting {prefix!r} (timeout {timeout} s)")) is not None:
            if line.startswith(prefix):
                return line
        raise AssertionError(f"the run ended without printing {prefix!r}:\n{self.stdout}\n{self.stderr}")

    def wait_for_step(self, accept, timeout=300):
        """Read stdout up to the first `Step N: loss=...` line whose N `accept(N)` takes, and return N."""
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline, f"the step asked for (timeout {timeout} s)")) is not None:
            if line.startswith("Step ") and accept(int(line[5:line.index(":")])):
                return int(line[5:line.index(":")])
        raise AssertionError(f"the run ended without the step asked for:\n{self.stdout}\n{self.stderr}")

    def send(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=300):
        """Read the rest and wait: the exit status."""
        deadline = time.monotonic() + timeout
        waiting_for = f"the end of the run (timeout {timeout} s)"
        while self._next_line(deadline, waiting_for) is not None:
            pass
        try:
            status = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._give_up(waiting_for)
        Child.running.discard(self)
        return status

    def kill(self):
        """SIGKILL to the child's process group (what it started goes too), and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        finally:
            self._reader.join(timeout=5)
            Child.running.discard(self)
        while True:  # what it printed before it died, for the message of the wait that gave up
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._ended = True
            else:
                self.lines.append(line)

    @property
    def returncode(self):
        """The exit status once waited for, else None."""
        return self.proc.returncode

    @property
    def stdout(self):
        return "".join(self.lines)

    @property
    def stderr(self):
        self._stderr.seek(0)
        return self._stderr.read()


class Finetune(Child):
    """The fine-tune command in a subprocess (see Child), to signal it at a given moment."""

    def __init__(self, args, **env):
        super().__init__(FINETUNE + [str(a) for a in args], env=subprocess_env(**env))


def small_checkpoint(output_dir, step, max_steps=100):
    """A checkpoint-<step> folder holding every file a usable checkpoint has, with tiny contents."""
    from safetensors.torch import save_file

    path = Path(output_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"weight": torch.ones(4, 4)}, str(path / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
               path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"cpu": torch.zeros(8, dtype=torch.uint8)}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return path


def pruned_blocks_are_zero(weight, mask, block=16):
    """True when every block the mask marks pruned is exactly zero in `weight`."""
    from sparse_adamw.masks import expand_block_mask

    dense = expand_block_mask(mask, weight.shape, block)
    return torch.equal(weight.detach()[~dense], torch.zeros_like(weight.detach()[~dense]))


class Logged(TrainerCallback):
    """Collects one key of the Trainer's logs (`loss`, `grad_norm`, ...) in `values`."""

    def __init__(self, key: str):
        self.key, self.values = key, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.key in logs:
            self.values.append(logs[self.key])


class LossLog(Logged):
    """Collects the Trainer's logged training losses."""

    def __init__(self):
        super().__init__("loss")

    @property
    def losses(self):
        return self.values


class SigintAt(TrainerCallback):
    """Sends this process a real SIGINT at the end of optimizer step `step`, like a Ctrl+C."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def trainer_args(output_dir, **overrides):
    """TrainingArguments for a short CPU run of a tiny model: 8 steps of 2 x 2 sequences, no checkpoints."""
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=8, learning_rate=3e-3, weight_decay=0.01, save_strategy="no", logging_steps=100,
                  report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)
