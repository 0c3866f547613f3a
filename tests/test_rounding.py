"""bf16 params: stochastic rounding is unbiased, identical across backends, and is what lets bf16 training move."""
import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask, sparse_adamw_reference
from sparse_adamw.reference import rounding_seed
from sparse_adamw.reference import round_to_bf16_stochastic
from tests.test_kernels import BACKENDS, CPU_BACKENDS, DEVICES, _skip_unrunnable


def test_stochastic_rounding_is_unbiased():
    n = 6000
    x = torch.randn(64) * torch.logspace(-3, 3, 64)
    for k, value in enumerate(x.tolist()):
        rounded = round_to_bf16_stochastic(torch.full((n,), value), torch.arange(n) + k * n, 11)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_backends_round_exactly_like_the_reference(device, impl):
    """Counter-based random bits: every backend makes the same rounding decisions as the reference, for every
    parameter of two groups with their own seeds (a seed mixes optimizer seed, step and position), on the general
    path (step 1) and on Triton's prepared launch (the steps after)."""
    _skip_unrunnable(impl, device)
    shapes = [(45, 70), (32, 48), (19, 33)]
    masks = [random_block_mask(shape, 0.3, device=device) for shape in shapes]
    params = [apply_block_mask_((torch.randn(shape) * 0.02).bfloat16().to(device), mask)
              for shape, mask in zip(shapes, masks)]
    groups = [{"params": params[:2], "seed": 7}, {"params": params[2:], "seed": 123456789012}]
    opt = SparseAdamW(groups, lr=1e-4, masks=dict(zip(params, masks)), impl=impl)
    seeds = [7, 7, 123456789012]
    refs = [(p.detach().cpu().clone(), torch.zeros(p.shape), torch.zeros(p.shape)) for p in params]
    for step in range(1, 8):
        grads = [torch.randn(p.shape).bfloat16() for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.to(device)
        opt.step()
        for index, (param, grad, mask) in enumerate(zip(params, grads, masks)):
            p, m, v = refs[index]
            p, m, v = sparse_adamw_reference(p, grad, m, v, step=step, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                             weight_decay=0.01, block_mask=mask.cpu(),
                                             rounding_seed=rounding_seed(seeds[index], step, index))
            refs[index] = (p, m, v)
            assert torch.equal(param.detach().cpu(), p), f"step {step}, parameter {index}"


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
