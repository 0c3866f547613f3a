"""Shared test helpers."""
import time

import numpy as np
import torch


def assert_close_verbose(actual, expected, *, atol=0.0, rtol=0.0, msg=""):
    """Like torch.testing.assert_close, but says how many elements differ, where, and how NaN/inf disagree."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = actual.isnan() & expected.isnan()
    same_inf = actual.isinf() & (actual == expected)
    diff = (actual - expected).abs()
    bad = ~(both_nan | same_inf | (diff <= atol + rtol * expected.abs()))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        firsts = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item():.8g} vs {expected[tuple(i)].item():.8g}" for i in idx)
        nan_mismatch = int((actual.isnan() ^ expected.isnan()).sum())
        finite = ~bad | (actual.isfinite() & expected.isfinite())
        raise AssertionError(
            f"{msg}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {diff[finite].max().item() if finite.any() else float('nan'):.3g}; "
            f"NaN disagreements {nan_mismatch}; first: {firsts}"
        )


def rel_err(actual, expected):
    """max |actual - expected| over max |expected|, in float64."""
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


def spawn_ranks(fn, args=(), nprocs=2, timeout=900):
    """torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn"), joined with a deadline: a rank
    that fails fails the test as join=True does (the other ranks stopped, its traceback in the exception); past
    `timeout` seconds the ranks still running are killed and the test fails with an AssertionError, where join=True
    would wait forever on a rank stuck in a collective."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            stuck = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(timeout=30)
            raise AssertionError(f"gave up after {timeout} s: rank(s) {stuck} of {nprocs} running "
                                 f"{getattr(fn, '__name__', fn)} had not finished (killed)")


def kron_mask(block_mask, shape, bh=16, bw=16) -> np.ndarray:
    """The elementwise mask of a block mask, by a Kronecker product with a block of ones (cut at the edges): an
    oracle sharing no code with sparse_adamw.masks.expand_block_mask."""
    full = np.kron(block_mask.numpy().astype(np.float64), np.ones((bh, bw)))
    return full[: shape[0], : shape[1]]
