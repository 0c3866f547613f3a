"""The reference implementation against torch.optim.AdamW when every block is live, and its masking."""
import pytest
import torch

from sparse_adamw import random_block_mask, sparse_adamw_reference
from sparse_adamw.masks import expand_block_mask
from tests.utils import assert_close_verbose


@pytest.mark.parametrize("shape", [(1151, 278), (17, 33), (300,), (1,), (0,), (0, 5)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reference_matches_torch_adamw(shape, weight_decay):
    lr, betas, eps = 3e-3, (0.8, 0.95), 1e-6
    torch_param = torch.nn.Parameter(torch.randn(shape))
    torch_opt = torch.optim.AdamW([torch_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  foreach=False)
    p = torch_param.detach().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for step in range(1, 9):
        grad = torch.randn(shape) * 10 ** (step % 3 - 1)
        torch_param.grad = grad.clone()
        torch_opt.step()
        p, m, v = sparse_adamw_reference(p, grad, m, v, step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                                         weight_decay=weight_decay)
        state = torch_opt.state[torch_param]
        # Cancellation in the moments makes absolute error scale with the largest value, not each value.
        for ours, theirs, name in ((p, torch_param, "param"), (m, state["exp_avg"], "exp_avg"),
                                   (v, state["exp_avg_sq"], "exp_avg_sq")):
            scale = theirs.abs().max().item() if theirs.numel() else 0.0
            assert_close_verbose(ours, theirs, atol=1e-6 * scale, rtol=1e-5, msg=f"{name}, step {step}")


def test_reference_leaves_pruned_blocks_bitwise():
    shape = (50, 37)
    mask = random_block_mask(shape, 0.5)
    live = expand_block_mask(mask, shape)
    p = torch.randn(shape).masked_fill(~live, 0.0)
    m, v = torch.randn(shape), torch.rand(shape)
    grad = torch.randn(shape)
    grad[~live] = torch.tensor([float("nan"), float("inf"), 1e30]).repeat(int((~live).sum()) // 3 + 1)[: int((~live).sum())]
    new_p, new_m, new_v = sparse_adamw_reference(p, grad, m, v, step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                                 weight_decay=0.1, block_mask=mask)
    for new, old in ((new_p, p), (new_m, m), (new_v, v)):
        assert torch.equal(new[~live], old[~live])
        assert not torch.equal(new[live], old[live])
        assert new[live].isfinite().all()
