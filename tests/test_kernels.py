"""Every backend against the reference, step by step, on fresh random inputs.

Live values: the backend's error against an fp64 reference is at most twice that of the fp32 reference (plain
PyTorch math) plus a little. Pruned blocks: params and state compared with torch.equal, while their gradients
hold NaN, inf and huge values.
"""
import os

import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask, sparse_adamw_reference
from sparse_adamw.backends import LaunchConfig
from sparse_adamw.masks import expand_block_mask

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CPU_BACKENDS = ["torch", "triton", "cpp"]  # backends that update CPU tensors
BACKENDS = CPU_BACKENDS + [pytest.param("cuda", marks=pytest.mark.gpu)]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


def _skip_unrunnable(impl, device):
    if impl == "triton" and device == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if (impl, device) in (("cpp", "cuda"), ("cuda", "cpu")):
        pytest.skip(f"the {impl} backend does not update {device} tensors")


def _poison_grad(grad, live):
    """Put NaN, inf and huge values in the pruned entries of `grad`."""
    pruned = ~live
    n = int(pruned.sum())
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3e38])
    grad[pruned] = junk.repeat(n // 5 + 1)[:n].to(grad.dtype)
    return grad


def _check_step(opt, param, before, grad, step, mask, block, msg):
    """Compare one step of `opt` on `param` with the reference, from the same pre-step state `before`."""
    p0, m0, v0 = before
    ref32 = sparse_adamw_reference(p0, grad, m0, v0, step=step, block_mask=mask, block_size=block, **HYPER)
    ref64 = sparse_adamw_reference(p0, grad, m0, v0, step=step, block_mask=mask, block_size=block,
                                   compute_dtype=torch.float64, **HYPER)
    state = opt.dense_state(param)
    got = (param.detach(), state["exp_avg"], state["exp_avg_sq"])
    live = expand_block_mask(mask.cpu(), param.shape, block) if mask is not None else torch.ones(param.shape, dtype=torch.bool)
    for name, g, r32, r64, old in zip(("param", "exp_avg", "exp_avg_sq"), got, ref32, ref64, before):
        g, r32, r64, old = (t.cpu() for t in (g, r32, r64, old))
        assert torch.equal(g[~live], old[~live]), f"{msg}: {name} changed in a pruned block at step {step}"
        if live.any():
            err_ours = (g[live].double() - r64.double()[live]).abs().max().item()
            err_torch = (r32[live].double() - r64.double()[live]).abs().max().item()
            tiny = 1e-7 * r64.double()[live].abs().max().item()
            assert err_ours <= 2 * err_torch + tiny, (
                f"{msg}: {name} at step {step}: error {err_ours:.3g} vs reference fp32 error {err_torch:.3g}")
    return tuple(t.detach().cpu().clone() for t in got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 1.0])
def test_backend_matches_reference(device, impl, dtype, sparsity):
    _skip_unrunnable(impl, device)
    shape, block = (75, 93), (16, 16)  # neither dim a multiple of 16: partial edge blocks everywhere
    mask = random_block_mask(shape, sparsity, block, device=device)
    param = apply_block_mask_(torch.randn(shape, device=device).to(dtype), mask, block)
    opt = SparseAdamW([param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], masks={param: mask}, block_size=block, impl=impl,
                      stochastic_rounding=False)  # rounding to nearest, as the reference; test_rounding does the rest
    live = expand_block_mask(mask.cpu(), shape, block)
    before = (param.detach().cpu().clone(), torch.zeros(shape), torch.zeros(shape))
    for step in range(1, 8):
        grad = _poison_grad(torch.randn(shape), live).to(dtype)
        param.grad = grad.to(device)
        opt.step()
        before = _check_step(opt, param, before, grad, step, mask.cpu(), block,
                             f"{impl}/{device}/{dtype}/sparsity {sparsity}")
    assert torch.equal(param.detach().cpu()[~live], torch.zeros(int((~live).sum()), dtype=dtype))
    # Compact state: exactly one slot per live block.
    assert opt.state[param]["exp_avg"].shape == (int(mask.sum()), *block)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shape,block", [((1151, 278), (16, 16)), ((33, 100), (8, 32)), ((40, 21), (5, 3)),
                                         ((1, 700), (16, 16)), ((16, 16), (16, 16))])
def test_odd_shapes_and_block_sizes(device, impl, shape, block):
    _skip_unrunnable(impl, device)
    mask = random_block_mask(shape, 0.3, block, device=device)
    param = apply_block_mask_(torch.randn(shape, device=device), mask, block)
    opt = SparseAdamW([param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], masks={param: mask}, block_size=block, impl=impl)
    live = expand_block_mask(mask.cpu(), shape, block)
    before = (param.detach().cpu().clone(), torch.zeros(shape), torch.zeros(shape))
    for step in range(1, 8):
        grad = _poison_grad(torch.randn(shape), live)
        param.grad = grad.to(device)
        opt.step()
        before = _check_step(opt, param, before, grad, step, mask.cpu(), block, f"{impl}/{shape}/{block}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_many_params_one_step(device, impl):
    """Masked, unmasked, 1-D, empty and grad-less params of one dtype together, against per-param references."""
    _skip_unrunnable(impl, device)
    shapes = [(64, 48), (37, 50), (128,), (1,), (0,), (17, 33), (5, 3, 7), (48, 16)]
    params = [torch.randn(s, device=device) for s in shapes]
    masks = {}
    for i in (0, 1, 7):
        masks[params[i]] = random_block_mask(shapes[i], 0.4, device=device)
        apply_block_mask_(params[i], masks[params[i]])
    opt = SparseAdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], masks=masks, impl=impl)
    no_grad = params[5]
    frozen = no_grad.detach().clone()
    befores = [(p.detach().cpu().clone(), torch.zeros(p.shape), torch.zeros(p.shape)) for p in params]
    for step in range(1, 8):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        no_grad.grad = None
        opt.step()
        for i, p in enumerate(params):
            if p is no_grad:
                continue
            mask = masks.get(p)
            befores[i] = _check_step(opt, p, befores[i], grads[i], step, None if mask is None else mask.cpu(),
                                     (16, 16), f"{impl}, param {i} {tuple(p.shape)}")
    assert torch.equal(no_grad, frozen)
    assert "exp_avg" not in opt.state[no_grad]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_one_launch_per_dtype(device, monkeypatch):
    _skip_unrunnable("triton", device)
    from sparse_adamw.triton_kernels import sparse_adamw as kernels

    launches = []
    real = kernels._sparse_adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_sparse_adamw_kernel", Counting())
    fp32 = [torch.randn(32, 48, device=device) for _ in range(5)] + [torch.randn(20, device=device)]
    bf16 = [torch.randn(16, 64, device=device, dtype=torch.bfloat16) for _ in range(4)]
    opt = SparseAdamW(fp32 + bf16, impl="triton")
    for p in fp32 + bf16:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(launches) == 2


def _n_compiled(fn):
    """Number of compiled variants of a Triton kernel (the cache attribute moved across Triton versions)."""
    if hasattr(fn, "device_caches"):
        return sum(len(caches[0]) for caches in fn.device_caches.values())
    return sum(len(c) for c in fn.cache.values())


@pytest.mark.gpu
def test_triton_does_not_recompile_when_lr_and_step_change():
    from sparse_adamw.triton_kernels import sparse_adamw as kernels

    params = [torch.randn(64, 80, device="cuda"), torch.randn(33, device="cuda")]
    masks = {params[0]: random_block_mask(params[0].shape, 0.5, device="cuda")}
    opt = SparseAdamW(params, lr=1e-3, masks=masks, impl="triton")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    counts = []
    for _ in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        torch.cuda.synchronize()
        counts.append(_n_compiled(kernels._sparse_adamw_kernel))
    assert counts[0] >= 1 and counts == [counts[0]] * 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_64", [False, True])
@pytest.mark.parametrize("blocks_per_program", [1, 8])
def test_triton_launch_variants(device, index_64, blocks_per_program):
    """Launch variants (64-bit offsets for huge tensors, tile sizes) compute the same update."""
    _skip_unrunnable("triton", device)
    launch = LaunchConfig(blocks_per_program=blocks_per_program, index_64=index_64)
    shape, block = (70, 90), (16, 16)
    mask = random_block_mask(shape, 0.3, device=device)
    param = apply_block_mask_(torch.randn(shape, device=device), mask)
    dense = torch.randn(150, device=device)
    opt = SparseAdamW([param, dense], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], masks={param: mask}, impl="triton", launch=launch)
    live = expand_block_mask(mask.cpu(), shape, block)
    before = (param.detach().cpu().clone(), torch.zeros(shape), torch.zeros(shape))
    before_dense = (dense.cpu().clone(), torch.zeros(150), torch.zeros(150))
    for step in range(1, 8):
        grad, grad_dense = _poison_grad(torch.randn(shape), live), torch.randn(150)
        param.grad, dense.grad = grad.to(device), grad_dense.to(device)
        opt.step()
        before = _check_step(opt, param, before, grad, step, mask.cpu(), block, "masked")
        before_dense = _check_step(opt, dense, before_dense, grad_dense, step, None, block, "dense")


def _torch_adamw_fp64(p, m, v, grad, step, lr, beta1, beta2, eps, weight_decay):
    """One step of torch.optim.AdamW in fp64 from state (p, m, v) after `step - 1` steps: an oracle that shares no
    code with the package."""
    p64 = torch.nn.Parameter(p.double().clone())
    opt = torch.optim.AdamW([p64], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=False)
    opt.state[p64] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.double().clone(),
                      "exp_avg_sq": v.double().clone()}
    p64.grad = grad.double()
    opt.step()
    return p64.detach(), opt.state[p64]["exp_avg"], opt.state[p64]["exp_avg_sq"]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |x| (its smallest normal's below that)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_states_against_torch_adamw(device, impl, param_dtype):
    """bf16 moments (the 7B headline's setting), checked step by step against fp64 torch.optim.AdamW started from
    what the backend stored: each stored value must be the oracle's within bf16 storage (an ulp for bf16 values, a
    few fp32 ulps for fp32 params). Masked and dense parameters, partial edge blocks, 8 steps."""
    _skip_unrunnable(impl, device)
    gen = torch.Generator().manual_seed(17)
    shape, block = (50, 70), (16, 16)
    mask = random_block_mask(shape, 0.3, block, generator=gen)
    masked = apply_block_mask_((torch.randn(shape, generator=gen) * 0.05).to(param_dtype), mask).to(device)
    dense = (torch.randn(37, generator=gen) * 0.05).to(param_dtype).to(device)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    opt = SparseAdamW([masked, dense], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                      weight_decay=hyper["weight_decay"], masks={masked: mask.to(device)}, impl=impl,
                      state_dtype=torch.bfloat16, stochastic_rounding=False)
    live = {masked: expand_block_mask(mask, shape, block), dense: torch.ones(37, dtype=torch.bool)}
    stored = {p: (p.detach().cpu().float().clone(), torch.zeros(p.shape), torch.zeros(p.shape)) for p in (masked, dense)}
    for step in range(1, 9):
        grads = {p: torch.randn(p.shape, generator=gen).to(param_dtype) for p in (masked, dense)}
        for p, g in grads.items():
            p.grad = g.to(device)
        opt.step()
        for p, name in ((masked, "masked"), (dense, "dense")):
            state = opt.dense_state(p)
            got = tuple(t.detach().cpu().float().clone() for t in (p, state["exp_avg"], state["exp_avg_sq"]))
            want = _torch_adamw_fp64(*stored[p], grads[p].float(), step, **hyper)
            on = live[p]
            for what, g, w, old in zip(("param", "exp_avg", "exp_avg_sq"), got, want, stored[p]):
                assert torch.equal(g[~on], old[~on]), f"{name} {what} changed in a pruned block at step {step}"
                w = w[on]
                if what == "param" and param_dtype == torch.float32:
                    # a few fp32 roundings of the weight and of the lr-sized update
                    tol = 8 * torch.finfo(torch.float32).eps * (w.abs() + hyper["lr"])
                else:
                    tol = _bf16_ulp(w).double() * 0.5 + 1e-3 * _bf16_ulp(w).double() + 1e-30
                err = (g[on].double() - w).abs()
                assert (err <= tol).all(), (f"{impl}/{device}/{param_dtype} {name} {what}, step {step}: max error "
                                            f"{(err / tol).max().item():.2f} x tolerance")
            stored[p] = got
