"""The fine-tune's callbacks: Ctrl+C and SIGTERM, the step log, and when the steps and checkpoints happened.

SparseTrainer (trainer.py) installs SignalCheckpointCallback; the fine-tune (finetune.py) adds the others. They know
nothing of SparseTrainer: each works in a plain transformers.Trainer too.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import torch
from transformers import TrainerCallback

__all__ = [
    "EXIT_ABORTED",
    "LogAtCheckpoints",
    "SigintCheckpointCallback",
    "SignalCheckpointCallback",
    "StepClock",
    "StepLogCallback",
    "TrainingAborted",
]


# ------------------------------------------------------------------------------------- Ctrl+C and SIGTERM
EXIT_ABORTED = 130  # the shell's status for a job stopped by SIGINT

_SIGNAL_NAMES = {signal.SIGINT: "Ctrl+C", signal.SIGTERM: "SIGTERM"}


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl+C or SIGTERM after the first asked for a checkpoint: training stops at once, even in the middle
    of that checkpoint's save. A command line prints `str(err)` (one line) and exits with `err.exit_status` (130)."""

    exit_status = EXIT_ABORTED


class SignalCheckpointCallback(TrainerCallback):
    """First Ctrl+C (SIGINT) or SIGTERM: save a checkpoint at the end of the current optimizer step and stop; a second
    one raises TrainingAborted.

    The checkpoint goes through the Trainer's normal path (control.should_save), so it holds the model, the
    optimizer and scheduler states, the RNG states and trainer_state.json, and `resume_from_checkpoint` continues
    from it. A second signal during that save leaves the folder without trainer_state.json (written last), so a
    resume that looks for it skips the folder. Under several processes the ranks agree on the stop step (one
    all-reduce of a flag per optimizer step, read one step later: they stop one step after the signal), so a signal
    that reaches them at slightly different times cannot leave one rank waiting for the others. The handlers are
    installed at on_train_begin and removed at on_train_end (SparseTrainer also removes them if training raises).
    `SigintCheckpointCallback` is the same class.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.stopped_at: Optional[int] = None
        self.saved = False  # the stop checkpoint is complete
        self._first: Optional[int] = None
        self._sent = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        self.requested, self.stopped_at, self.saved, self._first = False, None, False, None
        self._sent = None  # under several processes: (the flag sent at the last step, its completion)
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherits the handler: the training process decides, the worker waits
        name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
        if self.requested and self._first is not None:
            first = _SIGNAL_NAMES.get(self._first, f"signal {self._first}")
            what = f"Second {name}" if signum == self._first else f"{name} after {first}"
            if self.saved:
                raise TrainingAborted(f"{what}: stopped; the checkpoint of step {self.stopped_at} is complete")
            raise TrainingAborted(f"{what}: stopped without finishing the checkpoint; the last complete checkpoint "
                                  "is kept")
        self.requested, self._first = True, signum
        if os.environ.get("RANK", "0") == "0":
            when = "this step" if os.environ.get("WORLD_SIZE", "1") == "1" else "the next step (the ranks agree on it)"
            print(f"\n{name}: saving a checkpoint at the end of {when}, then stopping "
                  f"(another {name} stops at once, without it)", file=sys.stderr, flush=True)

    def _agreed(self, args) -> bool:
        """Whether the ranks stop now. Each step sends this rank's flag (an all-reduce of the maximum) and reads the
        one sent a step earlier, long complete by then: reading this step's own would hold the host until the GPU
        has finished the step, every step, and leave the GPU idle while the host then prepares the next one. So
        under several processes the ranks stop together one step after the signal."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1):
            return self.requested
        agreed = False
        if self._sent is not None:
            host, done = self._sent
            if done is not None:
                done.synchronize()
            agreed = bool(host.item())
        flag = torch.full((1,), 1.0 if self.requested else 0.0, device=args.device)  # no host-to-device copy
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.device.type == "cuda":
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._sent = (host, done)
        else:
            self._sent = (flag, None)  # gloo's all-reduce of a CPU tensor is complete on return
        return agreed

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved = self.stopped_at is not None

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()


SigintCheckpointCallback = SignalCheckpointCallback  # the name README and older code use


# ------------------------------------------------------------------------------------------------ step log
HEARTBEAT_S = 15.0  # in a log file, the longest silence between two lines while training
REDRAW_S = 0.2  # on a terminal, the shortest interval between two redraws of the progress line


class _ProgressLine:
    """One line on a terminal, redrawn in place with '\\r'; `clear` blanks it so that the next output starts on a
    clean line."""

    def __init__(self, stream):
        self.stream, self.width = stream, 0

    def draw(self, text: str) -> None:
        text = text[:max(shutil.get_terminal_size().columns - 1, 20)]  # a wrapped line cannot be redrawn
        self.stream.write("\r" + text + " " * (self.width - len(text)))  # blanks the rest of a longer one
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class _ClearsFirst:
    """Stands in for sys.stdout or sys.stderr (and logging handlers' streams) while the progress line is up: any
    other output clears the line first, so it never lands after the progress text."""

    def __init__(self, stream, line: _ProgressLine):
        self._stream, self._line = stream, line

    def write(self, text):
        if text:
            self._line.clear()
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class StepLogCallback(TrainerCallback):
    """Prints `Step 10: loss=2.5432` at every logging step (main process), then the learning rate and timing, and
    between logging steps shows that training is alive.

    On a terminal (`stream.isatty()`): one progress line, `step 13/40, 8.10 s/step, 3 min 30 s left`, redrawn in
    place; the Step lines and any other output start on a clean line (sys.stdout, sys.stderr and the logging
    handlers that write to them clear it first while training). Elsewhere (a log file): that text as a heartbeat
    line whenever `heartbeat_s` seconds passed without a line. Heartbeats start with a lowercase `step`, so they
    never match `^Step (\\d+): loss=`. `stream` defaults to sys.stdout; `clock` to time.monotonic (tests pass fakes).
    """

    def __init__(self, stream=None, clock=None, heartbeat_s: float = HEARTBEAT_S):
        self.stream, self.clock, self.heartbeat_s = stream, clock or time.monotonic, heartbeat_s
        self._out = None  # the stream in use, chosen at on_train_begin
        self._start = None  # (time, step) when this train() began: the rate of the progress text
        self._last = None  # (time, step) of the last Step line: the rate in the next one
        self._said = self._drawn = 0.0  # when a line was last written (log file) or the progress line drawn
        self._line: Optional[_ProgressLine] = None
        self._redirected = []  # (sys attribute or logging handler, its stream, the _ClearsFirst)

    def on_train_begin(self, args, state, control, **kwargs):
        self.close()
        if not state.is_world_process_zero:
            return
        now = self.clock()
        self._start = self._last = (now, state.global_step)
        self._said = self._drawn = now
        self._out = self.stream or sys.stdout
        if getattr(self._out, "isatty", lambda: False)():
            self._line = _ProgressLine(self._out)
            self._redirect()

    def on_substep_end(self, args, state, control, **kwargs):
        self._tick(state)  # a micro-batch of gradient accumulation: steps can be long

    def on_step_end(self, args, state, control, **kwargs):
        self._tick(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            now, step = self.clock(), state.global_step
            extra = []
            if "learning_rate" in logs:
                extra.append(f"lr {logs['learning_rate']:.3g}")
            if self._last is not None and step > self._last[1]:
                per_step = (now - self._last[0]) / (step - self._last[1])
                extra.append(f"{per_step:.2f} s/step")
                if state.max_steps > step:
                    extra.append(f"{_duration((state.max_steps - step) * per_step)} left")
            self._last = (now, step)
            self._print(f"Step {step}: loss={logs['loss']:.4f}" + (f"  ({', '.join(extra)})" if extra else ""))
        elif "train_runtime" in logs:
            self._print(f"Training: {state.global_step} steps in {_duration(logs['train_runtime'])}, "
                        f"mean loss {logs.get('train_loss', float('nan')):.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Clear the progress line and give the streams back (SparseTrainer calls this if training raises)."""
        if self._line is not None:
            self._line.clear()
            self._line = None
        self._restore()

    def _print(self, text: str) -> None:
        if self._line is not None:
            self._line.clear()
        print(text, file=self._out or self.stream or sys.stdout, flush=True)
        self._said = self.clock()

    def _tick(self, state) -> None:
        if self._start is None or not state.is_world_process_zero:
            return
        now = self.clock()
        if self._line is not None:
            if now - self._drawn >= REDRAW_S:
                self._line.draw(self._progress(state, now))
                self._drawn = now
        elif now - self._said >= self.heartbeat_s:
            self._print(self._progress(state, now))

    def _progress(self, state, now: float) -> str:
        """`step 13/40, 8.10 s/step, 3 min 30 s left` (the rate over this train() so far)."""
        (began, first), step = self._start, state.global_step
        text = f"step {step}/{state.max_steps}" if state.max_steps > 0 else f"step {step}"
        if step <= first:
            return f"{text}, {_duration(now - began)} into the first step"
        per_step = (now - began) / (step - first)
        text += f", {per_step:.2f} s/step"
        if state.max_steps > step:
            text += f", {_duration((state.max_steps - step) * per_step)} left"
        return text

    def _redirect(self) -> None:
        """While the progress line is up, everything else written to the terminal clears it first."""
        for attr in ("stdout", "stderr"):
            stream = getattr(sys, attr)
            if stream is self._out or getattr(stream, "isatty", lambda: False)():
                proxy = _ClearsFirst(stream, self._line)
                setattr(sys, attr, proxy)
                self._redirected.append((attr, stream, proxy))
                for handler in _stream_handlers(stream):
                    handler.setStream(proxy)
                    self._redirected.append((handler, stream, proxy))

    def _restore(self) -> None:
        """Undo _redirect, except where someone else has swapped the stream since."""
        for target, stream, proxy in reversed(self._redirected):
            if isinstance(target, str):
                if getattr(sys, target) is proxy:
                    setattr(sys, target, stream)
            elif target.stream is proxy:
                target.setStream(stream)
        self._redirected = []


def _stream_handlers(stream) -> list:
    """The logging handlers (of every logger so far) that write to `stream`."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ------------------------------------------------------------------------------------------- step timing
class LogAtCheckpoints(TrainerCallback):
    """Log the loss whenever a checkpoint is saved or training stops: the checkpoints' log histories then cover every
    step, so the whole run's mean loss survives a resume. Added after the callbacks that decide to save or stop."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True
        return control

    on_epoch_end = on_step_end


class StepClock(TrainerCallback):
    """When each optimizer step of this process ended: the steady rate leaves out the first steps (warm-up,
    kernel compilation, the allocator growing). Also how long training paused for checkpoints (from the end of the
    step to on_save): the snapshot of one written in the background, or the whole write of one written in place."""

    def __init__(self):
        self.ends: List[float] = []
        self.checkpoint_seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_save(self, args, state, control, **kwargs):  # called once the checkpoint's snapshot is taken
        if self.ends:
            self.checkpoint_seconds += time.perf_counter() - self.ends[-1]

    def steady_seconds_per_step(self) -> Optional[float]:
        skip = min(3, len(self.ends) // 3)
        if len(self.ends) - skip < 2:
            return None
        return (self.ends[-1] - self.ends[skip]) / (len(self.ends) - 1 - skip)
