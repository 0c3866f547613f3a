"""ShardedSparseAdamW on 2 ranks against DDP with SparseAdamW on the same per-rank batches, in the same processes:
the same losses and weights bit for bit while clipping is inactive (gradient accumulation included), within a few
ulps with clipping; pruned blocks exactly zero; the gathered state equals DDP's optimizer state; a resume from it
continues exactly. On the CPU over gloo (GlooTransport), and on 2 GPUs over copy engines (CopyEngineTransport).
On 3 and 4 gloo ranks (several landing slots per owner, uneven shares), step by step against DDP: see
test_three_and_four_ranks_match_ddp."""
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
    """Odd shapes (70 rows: five 16-row blocks and a partial one), a norm without a mask, and a bias. `head_norm`
    adds a LayerNorm(37) at the end: two more small parameters, so that on 3 and 4 ranks some rank owns several
    small parameters while another owns one large one (see _check_owners)."""

    def __init__(self, dtype, seed, device="cpu", head_norm=False):
        super().__init__()
        torch.manual_seed(seed)
        self.first = torch.nn.Linear(40, 70)
        self.norm = torch.nn.LayerNorm(70)
        self.second = torch.nn.Linear(70, 37, bias=False)
        self.head = torch.nn.LayerNorm(37) if head_norm else None
        self.to(device, dtype)
        gen = torch.Generator().manual_seed(1)
        self.masks = {}
        for lin in (self.first, self.second):
            self.masks[lin.weight] = random_block_mask(lin.weight.shape, 0.3, generator=gen).to(device)
            apply_block_mask_(lin.weight.data, self.masks[lin.weight])

    def forward(self, x):
        out = self.second(torch.nn.functional.gelu(self.norm(self.first(x))))
        return out if self.head is None else self.head(out)

    def groups(self):
        modules = (self.first, self.norm, self.second) + (() if self.head is None else (self.head,))
        return [(m, list(m.parameters())) for m in modules]


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


def _bitwise(impl, device, world=2) -> bool:
    """Whether this backend gives DDP's bits: Triton on a GPU contracts the gradient's scaling (1 / world, which
    DDP applies before the step) into FMAs differently, a few ulps (docs/design.md, "Stochastic rounding of bf16
    weights"). On more than 2 ranks no backend does: an owner adds its peers' gradients to its own in an order of
    its own, where DDP's all-reduce sums them in gloo's or NCCL's (the sum of two gradients is the same either way,
    of three or more it is not), and on 3 ranks DDP also rounds each rank's g * (1/3) before the sum, where the
    sharded step rounds sum * (1/3)."""
    return world == 2 and not (impl == "triton" and device.type == "cuda")


def _worker(rank, world, port, impl, dtype, device_type, micro_steps=2, head_norm=False):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A rank whose check fails raises at once (no barrier), and start_processes stops the other, which may be
    # waiting in a collective; the timeout covers the rest.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=3))
    _check(rank, world, impl, dtype, device, micro_steps, head_norm)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see test_distributed.py: teardown under load sometimes aborts after the work is done


def _check(rank, world, impl, dtype, device, micro_steps, head_norm):
    net = _Net(dtype, 0, device, head_norm)
    opt = ShardedSparseAdamW(net.parameters(), model=net, forward_groups=net.groups(), **_optimizer_kwargs(impl,
                                                                                                          net.masks))
    base = _Net(dtype, 0, device, head_norm)
    ref = torch.nn.parallel.DistributedDataParallel(base)
    ref_opt = SparseAdamW(ref.parameters(), **_optimizer_kwargs(impl, base.masks))
    count = len(list(net.parameters()))
    assert 0 < len(opt.owned) < count and opt.state_bytes() == 0
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    # The weights, and (world - 1) slots of at least an even share landing (on 2 ranks: half of the weights).
    assert weights + (world - 1) * weights // world <= opt.buffer_bytes() < world * weights
    if world > 2:
        _check_owners(opt, world)
    bitwise = _bitwise(impl, device, world)
    # On more than 2 ranks the sums differ from DDP's in the last bits (see _bitwise), and Adam carries that into
    # the next steps: each step is compared from the same start instead, the oracle given the sharded run's weights
    # and gathered state after each comparison (the sharded run itself is never touched).
    stepwise = world > 2
    for step in range(EXACT_STEPS + CLIPPED_STEPS):
        exact = step < EXACT_STEPS
        max_norm = float("inf") if exact else 0.05  # inf: measure only
        for micro in range(micro_steps):  # gradient accumulation: only the last micro-step sends
            opt.push_gradients = micro == micro_steps - 1
            # The forward waits for each module's weights in its pre-hook (no synchronize() here): on a GPU, a
            # missing wait would read weights that are still on their way.
            loss = _backward(net, step, micro, rank, dtype, device)
            if micro < micro_steps - 1:
                with ref.no_sync():
                    ref_loss = _backward(ref, step, micro, rank, dtype, device)
            else:
                ref_loss = _backward(ref, step, micro, rank, dtype, device)
            if stepwise or (step <= EXACT_STEPS and bitwise):  # the same weights in both
                assert torch.equal(loss, ref_loss), f"loss of step {step}, micro-step {micro}"
            elif step <= EXACT_STEPS:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        norm, ref_norm = opt.clip_grad_norm_(max_norm), ref_opt.clip_grad_norm_(max_norm)
        if stepwise:  # the gradients the step reads (gathered by now): each owner's sum of every rank's, DDP's mean
            mean_grads = {id(q): q.grad.detach().clone() for q in ref.module.parameters()}
            _assert_owned_gradients(net, ref, opt, world, dtype, f"step {step}")
        torch.testing.assert_close(norm, ref_norm, rtol=max(1e-5, torch.finfo(dtype).eps) if stepwise else 1e-5,
                                   atol=0)
        if not exact:
            assert float(ref_norm) > max_norm  # the clip is active
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if stepwise:
            opt.synchronize()
            _assert_ranks_agree(net, f"after step {step}")
            _assert_step_close(net, ref, mean_grads, dtype, world, f"after step {step}")
        if step == EXACT_STEPS - 1:
            opt.synchronize()
            if not stepwise:
                _assert_same(net, ref, bitwise, f"after step {step}")
            full = opt.full_state_dict(rank0_only=True)
            if rank == 0:
                _assert_state_equal(full, ref_opt.state_dict(), bitwise, _reorder_tolerance(dtype, world)
                                    if stepwise else None)
            else:
                assert full == {}
            resume_weights = {k: v.clone() for k, v in net.state_dict().items()}
            resume_state = opt.full_state_dict()
        if stepwise and step < EXACT_STEPS + CLIPPED_STEPS - 1:  # the next step from the same start
            state = opt.full_state_dict()
            with torch.no_grad():
                for p, q in zip(net.parameters(), ref.module.parameters()):
                    q.copy_(p)
            ref_opt.load_state_dict(state)
    opt.synchronize()
    if not stepwise:  # (stepwise: each step was compared above)
        _assert_same(net, ref, False, "at the end")
    for p, mask in net.masks.items():
        pruned = ~mask.repeat_interleave(16, 0).repeat_interleave(16, 1)[:p.shape[0], :p.shape[1]]
        assert pruned.any() and torch.equal(p[pruned], torch.zeros_like(p[pruned]))
    owned_bytes = opt.state_bytes()
    assert 0 < owned_bytes < ref_opt.state_bytes()

    # Resume from the gathered state on other weights: the clipped steps again, exactly as the first run took them.
    again = _Net(dtype, 7, device, head_norm)
    again.load_state_dict(resume_weights)
    opt2 = ShardedSparseAdamW(again.parameters(), model=again, forward_groups=again.groups(),
                              **_optimizer_kwargs(impl, None))
    opt2.load_state_dict(resume_state)
    assert opt2.state_bytes() == owned_bytes
    for step in range(EXACT_STEPS, EXACT_STEPS + CLIPPED_STEPS):
        for micro in range(micro_steps):
            opt2.push_gradients = micro == micro_steps - 1
            _backward(again, step, micro, rank, dtype, device)
        opt2.clip_grad_norm_(0.05)
        opt2.step()
        opt2.zero_grad()
    opt2.synchronize()
    for (name, p), q in zip(again.named_parameters(), net.parameters()):
        assert torch.equal(p, q), f"{name} after resuming"


def _check_owners(opt, world):
    """The split the test means to cover: unequal shares, one rank owning a single large parameter and another
    several small ones."""
    owned = [None] * world
    dist.all_gather_object(owned, [p.numel() for p in opt.owned])
    shares = [sum(sizes) for sizes in owned]
    assert len(set(shares)) > 1, f"the ranks own equal shares {shares}: no uneven split to test"
    assert any(len(sizes) == 1 and sizes[0] > 1000 for sizes in owned), owned
    assert any(len(sizes) >= 2 and max(sizes) < 100 for sizes in owned), owned


def _reorder_tolerance(dtype, world):
    """Relative to the largest |value|: how far a mean of `world` gradients may move when its terms are added in
    another order (and on 3 ranks each rounded after * (1/3)): a rounding per term in each of the two sums. Measured
    here: up to 1.5 ulps (fp32 and bf16, 3 and 4 ranks)."""
    return 2 * world * torch.finfo(dtype).eps


def _assert_owned_gradients(net, ref, opt, world, dtype, what):
    """Each owned parameter's gradient (the sum of every rank's, which the step scales by 1 / world as it reads it)
    against DDP's mean, within the reordered sum's rounding: a peer's gradient landing where another's should, or
    twice, or not at all, moves it by a whole gradient."""
    owned = {id(p) for p in opt.owned}
    for (name, p), q in zip(net.named_parameters(), ref.module.parameters()):
        if id(p) not in owned:
            assert p.grad is None, f"{name} {what}: a gradient this rank sent to its owner is still here"
            continue
        got, want = p.grad.float() / world, q.grad.float()
        tol = _reorder_tolerance(dtype, world)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda m: f"{name} {what}, the gradient its owner steps with: {m}")


def _assert_ranks_agree(net, what):
    """Every rank holds the same weights, bit for bit: each owner's update reached every peer."""
    mine = [p.detach().cpu().clone() for p in net.parameters()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for (name, _), a, b in zip(net.named_parameters(), mine, theirs):
            assert torch.equal(a, b), f"{name} {what}: rank {rank} holds other weights than rank {dist.get_rank()}"


def _assert_step_close(net, ref, mean_grads, dtype, world, what):
    """One step from the same weights and state as DDP's. fp32: within the tolerance of the 2-rank test's clipped
    steps; bf16: within 2 ulps of the tensor's largest weight (stochastic rounding may take the other neighbour,
    and a gradient summed in bf16 in another order moves by ulps of its largest, not of its own). Except where DDP's
    mean gradient is within the reordered sum's rounding of zero, where the order of the sum may decide the sign
    of Adam's update: there by up to Adam's largest update, lr (x 2.5)."""
    lr = _optimizer_kwargs("torch", None)["lr"]
    for (name, p), q in zip(net.named_parameters(), ref.module.parameters()):
        grad = mean_grads[id(q)].float()
        near_zero = grad.abs() <= _reorder_tolerance(dtype, world) * grad.abs().max()
        want = q.detach().float()
        if dtype == torch.float32:
            close = 1e-6 + 1e-5 * want.abs()
        else:
            close = torch.full_like(want, 2 * torch.finfo(dtype).eps * want.abs().max().item())
        diff = (p.detach().float() - want).abs()
        bad = diff > torch.where(near_zero, torch.full_like(want, 2.5 * lr), close)
        assert not bad.any(), (f"{name} {what}: {int(bad.sum())} of {p.numel()} weights differ from DDP's beyond "
                               f"rounding, by up to {diff[bad].max().item():.3g} "
                               f"({int(near_zero.sum())} with a mean gradient near zero)")


def _assert_state_equal(full, expected, bitwise, reorder=None):
    """`reorder`: the moments came from gradients summed in another order than DDP's (more than 2 ranks), within
    this relative to their largest |value| (see _reorder_tolerance)."""
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
            elif reorder is not None:
                torch.testing.assert_close(got, value.cpu(), rtol=reorder, atol=reorder * value.abs().max().item(),
                                           msg=lambda m: f"{index} {key}: {m}")
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


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_and_four_ranks_match_ddp(world, dtype):
    """The same check on 3 and 4 ranks, where each owner has several peers and so several landing slots (on 2 ranks
    there is one, and a gradient cannot land in the wrong one): uneven shares (one rank owns a single large
    parameter, another several small ones), 3 micro-steps of gradient accumulation, clipping active in the last 2
    steps. No longer bit for bit with DDP (see _bitwise), so each step starts from the same weights and state as
    DDP's and is compared to it: the losses bit for bit, each owner's summed gradient and the weights and state
    after the step within the rounding of a sum taken in another order, every rank's weights equal bit for bit; and
    the resume again exactly."""
    spawn_ranks(_worker, args=(world, _free_port(), "torch", dtype, "cpu", 3, True), nprocs=world, timeout=300)


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
