"""bf16 params and states: stochastic rounding is unbiased, identical across backends, and is what lets bf16
training move and a bf16 exp_avg_sq follow an fp32 one."""
import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask, sparse_adamw_reference
from sparse_adamw.layout import compact_to_dense
from sparse_adamw.masks import expand_block_mask
from sparse_adamw.reference import rounding_seed
from sparse_adamw.reference import round_to_bf16_stochastic
from tests.test_kernels import BACKENDS, CPU_BACKENDS, DEVICES, _skip_unrunnable


@pytest.mark.parametrize("high", [False, True])
def test_stochastic_rounding_is_unbiased(high):
    """With either half of the element hash: the low half rounds params, the high half exp_avg_sq."""
    n = 6000
    x = torch.randn(64) * torch.logspace(-3, 3, 64)
    for k, value in enumerate(x.tolist()):
        rounded = round_to_bf16_stochastic(torch.full((n,), value), torch.arange(n) + k * n, 11, high=high)
        values = rounded.unique()
        # Only the two bf16 neighbours of x, adjacent bit patterns, bracketing x.
        assert values.numel() <= 2
        assert values.float().min() <= value <= values.float().max()
        ulp = 0.0
        if values.numel() == 2:
            assert abs(int(values[1].view(torch.int16)) - int(values[0].view(torch.int16))) == 1
            ulp = (values[1].float() - values[0].float()).item()
        # The mean of Bernoulli roundings: within 5 standard errors (at most ulp / (2 sqrt(n))) of x.
        err = abs(rounded.double().mean().item() - value)
        assert err <= 5 * ulp / (2 * n**0.5) + 1e-7 * abs(value), (value, err, ulp)


def test_stochastic_rounding_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.0])
    out = round_to_bf16_stochastic(x, torch.arange(7), 123)
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
    assert torch.equal(out[3:].float(), x[3:])  # exactly representable values never move


def _assert_rounded_alike(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Triton compiled for a GPU: its fp32 math contracts multiply-adds into FMAs and uses fast sqrt and division,
    so a value before rounding may sit an ulp or so (of its largest term) away from the reference's. Its random
    bits are the same, so a bf16 value takes the reference's rounding decision unless that ulp crosses the
    decision's boundary: at most one bf16 step apart, and rarely. Measured on an H200 over 2.6 M values: 0.16% of
    exp_avg (where its terms cancel), under 0.001% of params and exp_avg_sq; a kernel that flips a few low random
    bits of exp_avg_sq's half parts 1.4%."""
    if got.dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * want.abs().max().item(), msg=what)
        return
    apart = int((got != want).sum())
    assert apart <= 0.004 * got.numel() + 5, f"{what}: {apart} of {got.numel()} rounded otherwise"
    # One bf16 step; near zero, where exp_avg's two terms cancel, an fp32 ulp of the terms instead.
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-20 * want.abs().max().item(), msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_backends_round_exactly_like_the_reference(device, impl, dtype, state_dtype):
    """Counter-based random bits: every backend makes the same rounding decisions as the reference, for every
    parameter of two groups with their own seeds (a seed mixes optimizer seed, step and position), on the general
    path (step 1) and on Triton's prepared launch (the steps after); bf16 params and bf16 exp_avg_sq alike.

    Bit for bit over 7 steps, except Triton compiled for a GPU, whose fp32 math differs by an ulp or so
    (`_assert_rounded_alike`): there the reference restarts every step from the backend's values."""
    _skip_unrunnable(impl, device)
    exact = not (impl == "triton" and device == "cuda")
    shapes = [(45, 70), (32, 48), (19, 33)]
    masks = [random_block_mask(shape, 0.3, device=device) for shape in shapes]
    params = [apply_block_mask_((torch.randn(shape) * 0.02).to(dtype).to(device), mask)
              for shape, mask in zip(shapes, masks)]
    groups = [{"params": params[:2], "seed": 7}, {"params": params[2:], "seed": 123456789012}]
    opt = SparseAdamW(groups, lr=1e-4, masks=dict(zip(params, masks)), impl=impl, state_dtype=state_dtype)
    seeds = [7, 7, 123456789012]
    refs = [(p.detach().cpu().clone(), torch.zeros(p.shape, dtype=state_dtype), torch.zeros(p.shape, dtype=state_dtype))
            for p in params]
    for step in range(1, 8):
        grads = [torch.randn(p.shape).to(dtype) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.to(device)
        opt.step()
        for index, (param, grad, mask) in enumerate(zip(params, grads, masks)):
            p, m, v = refs[index]
            p, m, v = sparse_adamw_reference(p, grad, m, v, step=step, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                             weight_decay=0.01, block_mask=mask.cpu(),
                                             rounding_seed=rounding_seed(seeds[index], step, index))
            live = expand_block_mask(mask.cpu(), p.shape, 16)
            state = opt.state[param]
            got_p = param.detach().cpu().clone()  # not the param itself: on the CPU, .cpu() is no copy
            got_m, got_v = (compact_to_dense(state[k].cpu(), mask.cpu(), p.shape, (16, 16))
                            for k in ("exp_avg", "exp_avg_sq"))
            for name, got, want in (("param", got_p, p), ("exp_avg", got_m, m), ("exp_avg_sq", got_v, v)):
                what = f"step {step}, parameter {index}'s {name}"
                if name == "param":  # pruned blocks: never touched, by any backend
                    assert torch.equal(got[~live], want[~live]), what
                if not exact:
                    _assert_rounded_alike(got[live], want[live], what)
                elif name == "param" and dtype == torch.float32:  # rounded by no one: within an ulp or two of the
                    eps = torch.finfo(torch.float32).eps          # reference's sqrt (test_backends)
                    torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())
                else:
                    assert torch.equal(got[live], want[live]), what
            refs[index] = (p, m, v) if exact else (got_p, got_m.to(state_dtype), got_v.to(state_dtype))


@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_bf16_training_stalls_without_stochastic_rounding(impl):
    """Negative control: at lr 5e-5 on weights in [0.02, 0.05], round-to-nearest bf16 throws every update away.

    There a bf16 ulp is 1.2e-4 or 2.4e-4, so an Adam step of about lr = 5e-5 is under half an ulp
    (docs/design.md, "Stochastic rounding of bf16 weights").
    """
    torch.manual_seed(0)
    start = torch.empty(32, 64).uniform_(0.02, 0.05).bfloat16().float()
    target = start - 0.01

    def train(dtype, stochastic):
        w = torch.nn.Parameter(start.clone().to(dtype))
        opt = SparseAdamW([w], lr=5e-5, weight_decay=0.0, impl=impl, stochastic_rounding=stochastic, seed=1)
        for _ in range(100):
            w.grad = (w.detach().float() - target).to(dtype)  # gradient of 0.5 * ||w - target||^2
            opt.step()
        return w.detach().float()

    fp32 = train(torch.float32, False)
    nearest = train(torch.bfloat16, False)
    stochastic = train(torch.bfloat16, None)  # the default for bf16 params
    moved_fp32 = (start - fp32).mean().item()
    assert moved_fp32 > 0.8 * 100 * 5e-5  # Adam moves about lr per step on a steady gradient
    assert torch.equal(nearest, start)  # stalled: not one update survived rounding
    assert (start - stochastic).mean().item() == pytest.approx(moved_fp32, rel=0.05)


def _exp_avg_sq_after(impl, state_dtype, stochastic, steps=1500, shape=(32, 64)):
    """exp_avg_sq, as fp32, after `steps` steps on fp32 params whose gradients' scale falls 10x over the run."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = SparseAdamW([w], lr=1e-4, weight_decay=0.0, impl=impl, state_dtype=state_dtype,
                      stochastic_rounding=stochastic, seed=2)
    for t in range(steps):
        w.grad = torch.randn(shape) * 10 ** (-t / steps)
        opt.step()
    return opt.state[w]["exp_avg_sq"].float()


@pytest.mark.parametrize("impl", ["torch", "cpp"])  # Triton's bits equal the reference's (above); interpreted, slow
def test_bf16_exp_avg_sq_follows_fp32_over_a_long_run(impl):
    """With beta2 = 0.999 a step lowers exp_avg_sq by at most 0.1%, under half a bf16 step: rounded to nearest, a
    bf16 exp_avg_sq never decreases, and as the gradients fall it stays behind at twice the fp32 value (negative
    control). Rounded stochastically it follows the fp32 one: unbiased, each element within a few % of it."""
    fp32 = _exp_avg_sq_after("torch", torch.float32, None)
    nearest = _exp_avg_sq_after(impl, torch.bfloat16, False) / fp32
    stochastic = _exp_avg_sq_after(impl, torch.bfloat16, None) / fp32  # the default
    assert nearest.median() > 1.8, nearest.median()
    assert abs(stochastic.median().item() - 1) < 0.02, stochastic.median()
    assert 0.8 < stochastic.quantile(0.01) and stochastic.quantile(0.99) < 1.2, stochastic.quantile(
        torch.tensor([0.01, 0.99]))


def _ulps_moved(device, impl, steps, n_tensors=2, shape=(64, 64), seed=0):
    """bf16 params at 1.5 under a constant gradient, lr = 0.3 of an ulp there: each element moves up one ulp per step
    with probability 0.3. Returns each tensor's moves, in ulps, after each step: [step][tensor] (CPU float)."""
    ulp = 2.0 ** -7  # of bf16 in [1, 2)
    params = [torch.full(shape, 1.5, dtype=torch.bfloat16, device=device) for _ in range(n_tensors)]
    # Constant gradient: m / sqrt(v) is 1 after bias correction, so each step adds lr before rounding.
    opt = SparseAdamW(params, lr=0.3 * ulp, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0, impl=impl, seed=seed)
    moves = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.full(shape, -1.0, dtype=torch.bfloat16, device=device)
        opt.step()
        moves.append([((p.float().cpu() - 1.5) / ulp) for p in params])
    return moves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_stochastic_rounding_statistics(device, impl):
    """An oracle that shares nothing with the seeds' code: the statistics of the decisions. One step moves 30% of
    the elements; two tensors with the same values move together for 9% (independent bits per tensor); after 16
    steps the mean is 4.8 ulp with a spread of sqrt(16 x 0.3 x 0.7) = 1.83 ulp (independent bits per step: a seed
    that ignored the step would move the same elements every time, a spread of 16 x 0.46 = 7.3 ulp)."""
    _skip_unrunnable(impl, device)
    moves = _ulps_moved(device, impl, steps=16)
    n = moves[0][0].numel()
    first = [m.flatten() for m in moves[0]]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in first)
    for m in first:  # sd of a fraction of 4096 Bernoulli(0.3) draws: 0.007
        assert abs(m.mean().item() - 0.3) < 0.035
    both = (first[0] * first[1]).mean().item()
    assert abs(both - 0.09) < 0.025, f"two tensors moved together in {both:.3f} of the elements, not 0.09"
    last = torch.stack([m.flatten() for m in moves[-1]])
    assert abs(last.mean().item() - 4.8) < 0.15
    spread = last.std(dim=1)
    assert ((spread - (16 * 0.3 * 0.7) ** 0.5).abs() < 0.2).all(), f"spread {spread.tolist()} ulp, not 1.83"
    assert n == 64 * 64
