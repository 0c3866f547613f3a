"""Shared test helpers."""
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
