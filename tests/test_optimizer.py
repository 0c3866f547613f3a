"""SparseAdamW as a torch optimizer: groups, closures, schedulers, clipping, state_dict, masks, bad input."""
import copy
import logging

import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, block_mask_from_zeros, random_block_mask
from sparse_adamw.layout import compact_to_dense, dense_to_compact
from sparse_adamw.masks import expand_block_mask
from tests.utils import assert_close_verbose

BACKENDS = ["torch", "triton"]


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 24))
    masks = {}
    for lin in (model[0], model[3]):
        mask = random_block_mask(lin.weight.shape, 0.3)
        apply_block_mask_(lin.weight.data, mask)
        masks[lin.weight] = mask
    return model, masks


def _groups(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}]


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 40, generator=g)
    y = torch.randn(8, 24, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("impl", BACKENDS)
def test_dense_matches_torch_adamw_with_groups(impl):
    """No masks: SparseAdamW is AdamW, per group lr and weight decay included, and per-tensor step counts (a
    tensor without a gradient at the first step lags one step behind the others of its launch)."""
    model, _ = _model()
    twin = copy.deepcopy(model)
    ours = SparseAdamW(_groups(model), lr=1e-2, impl=impl)
    theirs = torch.optim.AdamW(_groups(twin), lr=1e-2, foreach=False)
    for step in range(8):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            _loss(m, step).backward()
            if step == 0:
                next(m.parameters()).grad = None
            opt.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, msg=f"{name} after step {step + 1}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_closure_zero_grad_and_clipping(impl):
    model, masks = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, masks=masks, impl=impl)

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for p, mask in masks.items():
        assert torch.equal(block_mask_from_zeros(p), mask)


@pytest.mark.parametrize("impl", BACKENDS)
def test_state_dict_resume_is_bit_identical(impl):
    """Train, save optimizer + scheduler mid-run, resume in a fresh copy: the same trajectory, bit for bit."""
    model, masks = _model()
    opt = SparseAdamW(_groups(model), lr=1e-2, masks=masks, impl=impl)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 1e-2], total_steps=10)

    def train(m, o, s, steps, offset):
        for step in range(offset, offset + steps):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
            s.step()

    train(model, opt, sched, 4, 0)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    train(model, opt, sched, 5, 4)

    resumed, _ = _model(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved[0])
    opt2 = SparseAdamW(_groups(resumed), lr=1e-2, impl=impl)  # no masks given: they come from the state_dict
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=[2e-2, 1e-2], total_steps=10)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    train(resumed, opt2, sched2, 5, 4)

    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq", "block_mask"):
            a, b = opt.state[p].get(key), opt2.state[q].get(key)
            assert (a == b) if isinstance(a, int) else (a is None and b is None) or torch.equal(a, b), key


def test_load_state_dict_keeps_state_and_mask_dtypes():
    p = torch.nn.Parameter(torch.randn(32, 32).bfloat16())
    mask = random_block_mask(p.shape, 0.5)
    apply_block_mask_(p.data, mask)
    opt = SparseAdamW([p], masks={p: mask})
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = SparseAdamW([p])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert opt2.state[p]["block_mask"].dtype == torch.bool
    assert torch.equal(opt2.state[p]["block_mask"], mask)


def test_load_state_dict_refuses_masks_of_other_weights():
    """A state saved for another prune of the same shapes would let this model's pruned blocks train."""
    gen = torch.Generator().manual_seed(5)
    kept = torch.nn.Parameter(torch.randn(48, 40, generator=gen))
    p = torch.nn.Parameter(torch.randn(48, 40, generator=gen))
    mask, other = random_block_mask(p.shape, 0.5, generator=gen), random_block_mask(p.shape, 0.5, generator=gen)
    apply_block_mask_(p.data, mask)
    opt = SparseAdamW([kept, p], masks={p: mask})
    kept.grad, p.grad = torch.randn_like(kept), torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    q = torch.nn.Parameter(apply_block_mask_(torch.randn(48, 40, generator=gen), other))
    target = SparseAdamW([kept, q], masks={q: other})
    with pytest.raises(ValueError, match=r"parameter #1 of group 0 .* marks \d+ blocks pruned that hold nonzeros"):
        target.load_state_dict(saved)
    assert torch.equal(target.state[q]["block_mask"], other) and "exp_avg" not in target.state[q]  # untouched
    opt.load_state_dict(saved)  # its own weights: accepted
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value), key


def test_hf_scheduler_and_lr_changes_follow():
    transformers = pytest.importorskip("transformers")
    model, masks = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, masks=masks, impl="triton")
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    seen = []
    for step in range(6):
        opt.zero_grad()
        _loss(model, step).backward()
        before = model[3].bias.detach().clone()
        opt.step()
        seen.append((opt.param_groups[0]["lr"], (model[3].bias - before).abs().max().item()))
        sched.step()
    # Warm-up from 0: the first step has lr 0 and must not move anything beyond weight decay (0 * wd = 0).
    assert seen[0][0] == 0.0 and seen[0][1] == 0.0
    assert all(moved > 0 for lr, moved in seen[1:] if lr > 0)


def test_auto_masks_from_zero_blocks(caplog):
    model, masks = _model()
    with caplog.at_level(logging.INFO, logger="sparse_adamw"):
        opt = SparseAdamW(model.parameters(), masks="auto")
    assert "masks for 2 of 6 parameters" in caplog.text
    for p, mask in masks.items():
        assert torch.equal(opt.state[p]["block_mask"], mask)
    assert "block_mask" not in opt.state[model[1].weight]


def test_nan_in_live_gradient_propagates_like_torch():
    p = torch.nn.Parameter(torch.randn(32, 32))
    twin = torch.nn.Parameter(p.detach().clone())
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[1, 1] = False
    apply_block_mask_(p.data, mask)
    apply_block_mask_(twin.data, mask)
    opt = SparseAdamW([p], masks={p: mask})
    ref = torch.optim.AdamW([twin], foreach=False)
    grad = torch.randn(32, 32)
    grad[3, 4] = float("nan")  # live block
    grad[20, 20] = float("nan")  # pruned block
    p.grad, twin.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    live = expand_block_mask(mask, p.shape, 16)
    # Every live element as torch's: the NaN where its gradient was NaN, the rest equal within fp32 rounding.
    assert p.isnan().nonzero().tolist() == [[3, 4]] and twin[live].isnan().sum() == 1 and twin[3, 4].isnan()
    torch.testing.assert_close(p.detach()[live], twin.detach()[live], rtol=1e-6, atol=1e-7, equal_nan=True)
    state = opt.dense_state(p)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key][live], ref.state[twin][key][live], rtol=1e-6, atol=1e-9,
                                   equal_nan=True, msg=key)
    assert torch.equal(p.detach()[~live], torch.zeros(int((~live).sum())))  # pruned: untouched, NaN ignored


def test_state_memory_is_live_fraction():
    w = torch.randn(256, 512)
    mask = random_block_mask(w.shape, 0.25)
    apply_block_mask_(w, mask)
    opt = SparseAdamW([w], masks={w: mask})
    w.grad = torch.randn_like(w)
    opt.step()
    dense_bytes = 2 * w.numel() * 4
    assert opt.state_bytes() == dense_bytes * 3 // 4


def test_compact_dense_conversion_round_trip():
    shape = (45, 70)
    mask = random_block_mask(shape, 0.4)
    dense = apply_block_mask_(torch.randn(shape), mask)
    compact = dense_to_compact(dense, mask, (16, 16))
    assert compact.shape == (int(mask.sum()), 16, 16)
    assert torch.equal(compact_to_dense(compact, mask, shape, (16, 16)), dense)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "learning rate"),
    (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), "beta at index 0"),
    (dict(betas=(0.9, -0.1)), "beta at index 1"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=(16, 0)), "block_size"),
    (dict(impl="cuda-magic"), "impl"),
    (dict(masks="yes"), "masks"),
    (dict(state_dtype=torch.float16), "state_dtype"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SparseAdamW([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_masks_name_the_parameter():
    w = torch.nn.Parameter(torch.randn(40, 40))
    b = torch.nn.Parameter(torch.randn(40))
    named = [("layer.weight", w), ("layer.bias", b)]
    with pytest.raises(ValueError, match=r"'layer.weight'.*shape \(2, 3\).*need \(3, 3\)"):
        SparseAdamW(named, masks={w: torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"'layer.weight'.*torch.bool"):
        SparseAdamW(named, masks={w: torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"'layer.bias'.*2-D"):
        SparseAdamW(named, masks={b: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        SparseAdamW(named, masks={torch.randn(40, 40): torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'layer.weight'.*on meta"):
        SparseAdamW(named, masks={w: torch.ones(3, 3, dtype=torch.bool, device="meta")})


def test_bad_params():
    with pytest.raises(ValueError, match="complex"):
        SparseAdamW([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="sparse"):
        SparseAdamW([torch.nn.Parameter(torch.randn(4, 4).to_sparse())])
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SparseAdamW([p])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_explicit_unavailable_backend_raises_with_cause(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SparseAdamW([p], impl="triton")
    p.grad = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step()


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "nonsense")
    with pytest.raises(ValueError, match="SPARSE_ADAMW_IMPL"):
        SparseAdamW([torch.nn.Parameter(torch.randn(4, 4))])
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "triton")
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SparseAdamW([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    assert opt._backends[(p.device, (torch.float32, torch.float32, torch.float32))].__name__.endswith("triton_impl")
