"""SparseAdamW.step's fast path (a prepared Triton launch) against the general path, step for step, bit for bit."""
import gc
import random
import weakref

import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask
from sparse_adamw.reference import rounding_seed
from sparse_adamw.masks import expand_block_mask

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FROZEN = 7  # the parameter that never has a gradient


def _twins(device, seed=0):
    """Two identical optimizers over identical params: `fast` as shipped, `slow` with the fast path off.

    Two launches (bf16 and fp32 params), odd shapes with partial edge blocks, a parameter with every block pruned,
    an empty one, 1-D params, a frozen one (never a gradient: FROZEN), and two groups with their own lr, weight
    decay and seed.
    """
    gen = torch.Generator().manual_seed(seed)
    specs = [((48, 80), torch.bfloat16, 0.3), ((33, 20), torch.bfloat16, 0.4), ((16, 32), torch.bfloat16, 1.0),
             ((37,), torch.bfloat16, None), ((40, 32), torch.float32, 0.25), ((0, 16), torch.float32, None),
             ((19,), torch.float32, None), ((24, 16), torch.bfloat16, 0.5)]
    params, masks = [], {}
    for shape, dtype, sparsity in specs:
        p = (torch.randn(shape, generator=gen) * 0.05).to(device=device, dtype=dtype)
        if sparsity is not None:
            masks[len(params)] = random_block_mask(shape, sparsity, generator=gen).to(device)
            apply_block_mask_(p, masks[len(params)])
        params.append(p)

    def make():
        ps = [p.clone() for p in params]
        groups = [{"params": [ps[0], ps[3], ps[4]], "lr": 1e-2, "seed": 3},
                  {"params": [ps[1], ps[2], ps[7], ps[5], ps[6]], "lr": 5e-3, "weight_decay": 0.0, "seed": 11}]
        opt = SparseAdamW(groups, masks={ps[i]: m for i, m in masks.items()}, impl="triton",
                          state_dtype=torch.bfloat16, weight_decay=0.1)
        return ps, opt

    fast, slow = make(), make()
    slow[1]._prepare_fast = lambda *args: None
    return fast, slow


def _set_fresh_grads(params, step):
    """New gradient tensors (as zero_grad(set_to_none=True) then backward gives), the same for both twins."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        if i != FROZEN:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def _stepped(device, seed, steps):
    """`fast` of _twins after `steps` steps on fresh gradients."""
    (params, opt), _ = _twins(device, seed)
    for step in range(steps):
        _set_fresh_grads(params, step)
        opt.step()
    return params, opt


def _record_paths(opt):
    """After each step, `paths` says whether that step took the fast path."""
    paths, inner, step = [], opt._fast_step, opt.step

    def fast_step(*args):
        paths[-1] = inner(*args)
        return paths[-1]

    def recorded_step(*args, **kwargs):
        paths.append(False)
        return step(*args, **kwargs)

    opt._fast_step, opt.step = fast_step, recorded_step
    return paths


def _assert_twins_equal(fast, slow):
    for p, q in zip(fast[0], slow[0]):
        assert torch.equal(p, q)
    for p, q in zip(fast[0], slow[0]):
        a, b = fast[1].state.get(p, {}), slow[1].state.get(q, {})
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_matches_general_path_bitwise(device):
    fast, slow = _twins(device)
    frozen = fast[0][FROZEN].clone()
    paths = _record_paths(fast[1])
    for step in range(6):
        for (params, opt) in (fast, slow):
            _set_fresh_grads(params, step)
            for group in opt.param_groups:
                group["lr"] *= 0.8  # as a scheduler does
            opt.step()
        _assert_twins_equal(fast, slow)
    assert paths == [False] + [True] * 5  # the first step prepares, the others take the fast path
    assert fast[1].state[fast[0][0]]["step"] == 6
    assert torch.equal(fast[0][FROZEN], frozen) and "exp_avg" not in fast[1].state[fast[0][FROZEN]]
    # Pruned blocks stay exactly zero (the fully pruned parameter too); live ones moved.
    params, opt = fast
    for p in params:
        mask = opt.state[p].get("block_mask")
        if mask is not None:
            live = expand_block_mask(mask, p.shape)
            assert not p[~live].any()
            assert p[live].all() or not live.any()


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_steps_aside_whenever_a_step_differs(device):
    fast, slow = _twins(device, seed=1)
    paths = _record_paths(fast[1])
    old_data = {}

    def change(step, params, opt):
        if step == 2:  # one parameter without a gradient: it must keep its value and step count
            params[1].grad = None
        if step == 4:  # a parameter's storage replaced; the old one must not be written again
            old_data[id(opt)] = params[0].data
            params[0].data = params[0].data.clone()
        if step == 6:  # a non-contiguous gradient
            g = params[4].grad
            params[4].grad = g.t().contiguous().t()
        if step == 8:  # a group's rounding switched off
            opt.param_groups[1]["stochastic_rounding"] = False

    for step in range(10):
        for (params, opt) in (fast, slow):
            _set_fresh_grads(params, step)
            change(step, params, opt)
            opt.step()
        _assert_twins_equal(fast, slow)
        if step == 4:
            kept = [t.clone() for t in old_data.values()]
    for before, t in zip(kept, old_data.values()):
        assert torch.equal(before, t)
    assert fast[1].state[fast[0][1]]["step"] == 9 and fast[1].state[fast[0][0]]["step"] == 10
    # Steps 2, 4, 6 and 8 differ from the plan, so the general path takes them and prepares a new plan where it can.
    # Steps 3 and 7 are general too: after step 2 the plan expects parameter 1 to stay without a gradient, and after
    # step 6 (a gradient made contiguous by a copy) no plan is made.
    assert paths == [False, True, False, False, False, True, False, False, False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_is_dropped_by_state_and_group_changes(device):
    params, opt = _stepped(device, seed=2, steps=2)
    assert opt._fast is not None
    opt.load_state_dict(opt.state_dict())
    assert opt._fast is None
    _set_fresh_grads(params, 5)
    opt.step()
    assert opt._fast is not None
    extra = torch.zeros(8, device=device, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    assert opt._fast is None
    # A sparse gradient after the plan is built still gets the general path's error.
    opt.param_groups.pop()
    opt.step()
    assert opt._fast is not None
    params[6].grad = torch.zeros(19, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_holds_no_gradient(device):
    params, opt = _stepped(device, seed=3, steps=3)
    refs = [weakref.ref(p.grad) for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_rounding_seeds_stay_what_they_were():
    """The seed of (optimizer seed, step, position) in one expression, as first written: the fast path's split of it
    into a per-step and a per-parameter part (combined by the kernel) changes no rounding decision."""
    def first_written(seed, step, index):
        h = (seed * 0x9E3779B1 ^ step * 0x85EBCA6B ^ index * 0xC2B2AE35) & 0xFFFFFFFF
        h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
        h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    rng = random.Random(0)
    for _ in range(500):
        seed, step, index = rng.randrange(2**40), rng.randrange(1, 2**33), rng.randrange(2**20)
        assert rounding_seed(seed, step, index) == first_written(seed, step, index)
