"""ShardedSparseAdamW on 2 ranks against DDP with SparseAdamW on the same per-rank batches, in the same processes:
the same losses and weights bit for bit while clipping is inactive (gradient accumulation included), within a few
ulps with clipping; pruned blocks exactly zero; the gathered state equals DDP's optimizer state; a resume from it
continues exactly. On the CPU over gloo (GlooTransport), and on 2 GPUs over copy engines (CopyEngineTransport)."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask
from sparse_adamw.sharded_step import ShardedSparseAdamW, assign_owners
from tests.test_kernels import INTERPRET
from tests.utils import spawn_ranks

EXACT_STEPS, CLIPPED_STEPS = 3, 2


def test_owners_balance_sizes_in_order():
    assert assign_owners([10, 4, 4, 3, 1], 2) == [0, 1, 1, 1, 0]  # loads 10 | 4, 8, 11 | 11
    assert assign_owners([5, 5, 5], 1) == [0, 0, 0]
    owners = assign_owners([7, 1, 1, 1, 1, 1, 1, 1], 3)
    assert owners[0] == 0 and owners.count(0) == 1  # the big one fills rank 0; the rest share ranks 1 and 2


class _Net(torch.nn.Module):
    """Odd shapes (70 rows: five 16-row blocks and a partial one), a norm without a mask, and a bias."""

    def __init__(self, dtype, seed, device="cpu"):
        super().__init__()
        torch.manual_seed(seed)
        self.first = torch.nn.Linear(40, 70)
        self.norm = torch.nn.LayerNorm(70)
        self.second = torch.nn.Linear(70, 37, bias=False)
        self.to(device, dtype)
        gen = torch.Generator().manual_seed(1)
        self.masks = {}
        for lin in (self.first, self.second):
            self.masks[lin.weight] = random_block_mask(lin.weight.shape, 0.3, generator=gen).to(device)
            apply_block_mask_(lin.weight.data, self.masks[lin.weight])

    def forward(self, x):
        return self.second(torch.nn.functional.gelu(self.norm(self.first(x))))

    def groups(self):
        return [(m, list(m.parameters())) for m in (self.first, self.norm, self.second)]


def _batch(step, micro, rank, dtype):
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(3, 40, generator=gen).to(dtype), torch.randn(3, 37, generator=gen).to(dtype)


def _backward(model, step, micro, rank, dtype, device):
    """One micro-step's backward; returns its loss."""
    x, y = (t.to(device) for t in _batch(step, micro, rank, dtype))
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    return loss.detach()


def _optimizer_kwargs(impl, masks):
    return dict(lr=1e-2, weight_decay=0.01, masks=masks, impl=impl, seed=5)


def _assert_same(net, ref, exact, what):
    for (name, p), q in zip(net.named_parameters(), ref.module.parameters()):
        if exact:
            assert torch.equal(p, q), f"{name} {what}: largest difference {(p - q).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {what}: {m}")


def _bitwise(impl, device) -> bool:
    """Whether this backend gives DDP's bits: Triton on a GPU contracts the gradient's scaling (1 / world, which
    DDP applies before the step) into FMAs differently, a few ulps (docs/design.md, "Stochastic rounding of bf16
    weights")."""
    return not (impl == "triton" and device.type == "cuda")


def _worker(rank, world, port, impl, dtype, device_type):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A rank whose check fails raises at once (no barrier), and start_processes stops the other, which may be
    # waiting in a collective; the timeout covers the rest.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=3))
    _check(rank, impl, dtype, device)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see test_distributed.py: teardown under load sometimes aborts after the work is done


def _check(rank, impl, dtype, device):
    net = _Net(dtype, 0, device)
    opt = ShardedSparseAdamW(net.parameters(), model=net, forward_groups=net.groups(), **_optimizer_kwargs(impl,
                                                                                                          net.masks))
    base = _Net(dtype, 0, device)
    ref = torch.nn.parallel.DistributedDataParallel(base)
    ref_opt = SparseAdamW(ref.parameters(), **_optimizer_kwargs(impl, base.masks))
    assert 0 < len(opt.owned) < 5 and opt.state_bytes() == 0
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    assert weights + weights // 2 <= opt.buffer_bytes() < 2 * weights  # the weights, and half of them landing
    bitwise = _bitwise(impl, device)
    for step in range(EXACT_STEPS + CLIPPED_STEPS):
        exact = step < EXACT_STEPS
        max_norm = float("inf") if exact else 0.05  # inf: measure only
        for micro in range(2):  # gradient accumulation: only the last micro-step sends
            opt.push_gradients = micro == 1
            # The forward waits for each module's weights in its pre-hook (no synchronize() here): on a GPU, a
            # missing wait would read weights that are still on their way.
            loss = _backward(net, step, micro, rank, dtype, device)
            if micro == 0:
                with ref.no_sync():
                    ref_loss = _backward(ref, step, micro, rank, dtype, device)
            else:
                ref_loss = _backward(ref, step, micro, rank, dtype, device)
            if step <= EXACT_STEPS and bitwise:  # the weights of the exact steps
                assert torch.equal(loss, ref_loss), f"loss of step {step}, micro-step {micro}"
            elif step <= EXACT_STEPS:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        norm, ref_norm = opt.clip_grad_norm_(max_norm), ref_opt.clip_grad_norm_(max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        if not exact:
            assert float(ref_norm) > max_norm  # the clip is active
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if step == EXACT_STEPS - 1:
            opt.synchronize()
            _assert_same(net, ref, bitwise, f"after step {step}")
            full = opt.full_state_dict(rank0_only=True)
            if rank == 0:
                _assert_state_equal(full, ref_opt.state_dict(), bitwise)
            else:
                assert full == {}
            resume_weights = {k: v.clone() for k, v in net.state_dict().items()}
            resume_state = opt.full_state_dict()
    opt.synchronize()
    _assert_same(net, ref, False, "at the end")
    for p, mask in net.masks.items():
        pruned = ~mask.repeat_interleave(16, 0).repeat_interleave(16, 1)[:p.shape[0], :p.shape[1]]
        assert pruned.any() and torch.equal(p[pruned], torch.zeros_like(p[pruned]))
    owned_bytes = opt.state_bytes()
    assert 0 < owned_bytes < ref_opt.state_bytes()

    # Resume from the gathered state on other weights: the clipped steps again, exactly as the first run took them.
    again = _Net(dtype, 7, device)
    again.load_state_dict(resume_weights)
    opt2 = ShardedSparseAdamW(again.parameters(), model=again, forward_groups=again.groups(),
                              **_optimizer_kwargs(impl, None))
    opt2.load_state_dict(resume_state)
    assert opt2.state_bytes() == owned_bytes
    for step in range(EXACT_STEPS, EXACT_STEPS + CLIPPED_STEPS):
        for micro in range(2):
            opt2.push_gradients = micro == 1
            _backward(again, step, micro, rank, dtype, device)
        opt2.clip_grad_norm_(0.05)
        opt2.step()
        opt2.zero_grad()
    opt2.synchronize()
    for (name, p), q in zip(again.named_parameters(), net.parameters()):
        assert torch.equal(p, q), f"{name} after resuming"


def _assert_state_equal(full, expected, bitwise):
    assert full["param_groups"] == expected["param_groups"]
    assert sorted(full["state"]) == sorted(expected["state"])
    for index, state in expected["state"].items():
        assert sorted(full["state"][index]) == sorted(state), index
        for key, value in state.items():
            got = full["state"][index][key]
            if not isinstance(value, torch.Tensor):
                assert got == value, (index, key)
            elif bitwise or value.dtype == torch.bool:
                assert torch.equal(got, value.cpu()), (index, key)
            else:
                torch.testing.assert_close(got, value.cpu(), rtol=1e-5, atol=1e-9, msg=lambda m: f"{index} {key}: {m}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_match_ddp(impl, dtype):
    if impl == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    spawn_ranks(_worker, args=(2, _free_port(), impl, dtype, "cpu"), nprocs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_gpus_over_copy_engines_match_ddp(impl, dtype):
    """The same check on 2 GPUs: the gradients and weights travel by copy engine through symmetric memory."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn_ranks(_worker, args=(2, _free_port(), impl, dtype, "cuda"), nprocs=2)


def test_refuses_what_it_cannot_do_right():
    # One gloo rank is enough for these checks.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        net = _Net(torch.float32, 0)
        with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
            ShardedSparseAdamW(list(net.first.parameters()), model=net)
        with pytest.raises(ValueError, match="leave out 1 trainable"):
            ShardedSparseAdamW(net.parameters(), model=net, forward_groups=net.groups()[:2])
        with pytest.raises(NotImplementedError, match="closure"):
            ShardedSparseAdamW(net.parameters(), model=net).step(lambda: 0.0)
        opt = ShardedSparseAdamW(net.parameters(), model=net, forward_groups=net.groups())
        with pytest.raises(RuntimeError, match="sent no gradient"):
            opt.step()  # no backward since the last step
        _backward(net, 0, 0, 0, torch.float32, "cpu")
        with pytest.raises(RuntimeError, match="second gradient for a parameter in one step"):
            _backward(net, 0, 1, 0, torch.float32, "cpu")  # accumulation without push_gradients = False
    finally:
        dist.destroy_process_group()
