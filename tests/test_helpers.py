"""The test helpers that start child processes: no wait can hang the suite.

finetune_helpers.Child gives its children SIGINT and SIGTERM at their defaults even where the test process ignores
them (as it does when run from a background job of a non-interactive shell: a test's Ctrl+C used to be lost, and the
test waited forever), and every wait on a child gives up at its deadline, kills the child's process group and fails
with what the child printed. tests.utils.spawn_ranks joins spawned ranks with a deadline too. The fine-tune itself
under an ignored SIGINT: test_finetune.py::test_a_real_ctrl_c_reaches_the_run_when_the_tests_ignore_sigint.
"""
import signal
import sys
import time

import pytest

from tests.utils import spawn_ranks

SLEEP = "import time; time.sleep(60)"


def _child(code):
    from finetune_helpers import Child, subprocess_env

    return Child([sys.executable, "-c", code], env=subprocess_env())


def _gone(pid, within=10.0):
    """True once `pid` has exited (no such process, or a zombie nobody has reaped yet), polling for up to `within`
    seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


WAITS = {
    "wait_for": lambda child: child.wait_for("never printed", timeout=1),
    "wait_for_step": lambda child: child.wait_for_step(lambda step: True, timeout=1),
    "finish": lambda child: child.finish(timeout=1),
}


@pytest.mark.parametrize("wait", WAITS)
def test_a_wait_on_a_silent_child_gives_up_at_its_deadline(wait):
    """A child that prints nothing and sleeps for a minute: each kind of wait fails with an AssertionError after
    its one-second timeout instead of waiting for the child, and the child is killed (SIGKILL), not left behind."""
    child = _child(SLEEP)
    with pytest.raises(AssertionError, match=r"gave up waiting for .*timeout 1 s"):
        WAITS[wait](child)
    assert child.returncode == -signal.SIGKILL


def test_a_wait_that_gives_up_shows_what_the_child_printed_and_kills_its_process_group():
    """The AssertionError carries the child's stdout and stderr so far; the child's own children (in its process
    group) are killed with it."""
    child = _child("import subprocess, sys, time\n"
                   "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                   "print('grandchild', grandchild.pid, flush=True)\n"
                   "print('a line on stderr', file=sys.stderr, flush=True)\n"
                   "time.sleep(60)\n")
    grandchild = int(child.wait_for("grandchild ", timeout=60).split()[1])
    with pytest.raises(AssertionError) as info:
        child.wait_for("never printed", timeout=1)
    message = str(info.value)
    assert f"grandchild {grandchild}" in message and "a line on stderr" in message, message
    assert child.returncode == -signal.SIGKILL
    assert _gone(grandchild), f"the child's own child {grandchild} outlived it"


def test_children_get_sigint_and_sigterm_at_their_defaults_whatever_this_process_has():
    """This process ignores SIGINT and blocks SIGTERM, both inherited through fork and exec: the child still has
    Python's KeyboardInterrupt handler for SIGINT, SIGTERM at its default and neither blocked, and a real SIGINT
    ends it with a KeyboardInterrupt."""
    report = ("import signal\n"
              "print('SIGINT', signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n"
              "print('SIGTERM', signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)\n"
              "blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())\n"
              "print('blocked', sorted(s.name for s in blocked if s in (signal.SIGINT, signal.SIGTERM)), "
              "flush=True)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        child = _child(report + "print('ready', flush=True)\n" + SLEEP)
        child.wait_for("ready", timeout=60)
        child.send(signal.SIGINT)
        status = child.finish(timeout=30)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, previous)
    assert child.stdout.splitlines()[:3] == ["SIGINT True", "SIGTERM True", "blocked []"], child.stdout
    assert status == -signal.SIGINT and "KeyboardInterrupt" in child.stderr, (status, child.stderr)


def _sleeping_rank(rank):
    time.sleep(60)


def _failing_rank(rank):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    time.sleep(60)


def test_spawned_ranks_that_do_not_finish_are_killed_at_the_deadline():
    import torch.multiprocessing as mp

    with pytest.raises(AssertionError, match=r"gave up after 2 s: rank\(s\) \[0, 1\] of 2 running _sleeping_rank"):
        spawn_ranks(_sleeping_rank, nprocs=2, timeout=2)
    assert not mp.active_children(), "a spawned rank outlived the deadline"


def test_a_spawned_rank_that_fails_fails_the_test_and_stops_the_others():
    """As join=True: the failing rank's exception, and the rank still sleeping is stopped."""
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        spawn_ranks(_failing_rank, nprocs=2, timeout=120)
    assert not mp.active_children(), "a spawned rank outlived the failure"
