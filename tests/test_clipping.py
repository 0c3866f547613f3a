"""SparseAdamW.grad_norm and clip_grad_norm_: the norm of the live blocks, and a step that scales the gradients as it
reads them, against a float64 norm computed the plain way and torch.optim.AdamW on clipped, masked gradients."""
import copy
import math
import os
import socket

import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, block_mask_from_zeros, random_block_mask
from sparse_adamw.masks import expand_block_mask
from tests.utils import assert_close_verbose, spawn_ranks

# (backend, device): every backend, on the CPU here and on a GPU with `pytest -m gpu`
CASES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu"),
    pytest.param("cpp", "cpu", id="cpp-cpu"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]
# Weights that are no whole number of blocks (70x40, 37x70), a bias, and a 2-D weight without a mask (33x37).
SHAPES = {"0.weight": (70, 40), "2.weight": (37, 70)}


def _model(device, dtype=torch.float32, block=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.GELU(), torch.nn.Linear(70, 37, bias=False),
                                torch.nn.Tanh(), torch.nn.Linear(37, 33, bias=False))
    masks = {}
    for name, p in model.named_parameters():
        if name in SHAPES:
            masks[name] = random_block_mask(p.shape, 0.4, block, generator=gen)
            apply_block_mask_(p.data, masks[name], block)
    model.to(device, dtype)
    return model, {name: mask.to(device) for name, mask in masks.items()}


def _params(model):
    return dict(model.named_parameters())


def _backward(model, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    x = torch.randn(9, 40, generator=gen).to(p.device, p.dtype)
    (model(x).float().square().mean() * scale).backward()


def _live(name, masks, p, block):
    if name not in masks:
        return torch.ones_like(p, dtype=torch.bool)
    return expand_block_mask(masks[name], p.shape, block)


def _live_norm(model, masks, block=16) -> float:
    """The norm of the live blocks of the gradients (whole parameters without a mask), in float64, by boolean
    indexing: no code shared with the optimizer."""
    parts = [p.grad.double()[_live(name, masks, p, block)] for name, p in model.named_parameters()
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(parts)))


def _poison_pruned(model, masks, block=16):
    """NaN, +inf and -inf (by turns) in every pruned block's gradient: step() never reads them."""
    for i, (name, p) in enumerate(sorted(_params(model).items())):
        if name in masks:
            p.grad.masked_fill_(~_live(name, masks, p, block), (math.nan, math.inf, -math.inf)[i % 3])


def _optimizer(model, masks, impl, **kwargs):
    params = _params(model)
    return SparseAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl,
                       masks={params[name]: mask for name, mask in masks.items()}, **kwargs)


@pytest.mark.parametrize("impl,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [16, (8, 24)], ids=["16x16", "8x24"])
def test_grad_norm_is_the_live_blocks_norm(impl, device, dtype, block):
    model, masks = _model(device, dtype, block)
    optimizer = _optimizer(model, masks, impl, block_size=block)
    _backward(model, seed=1)
    _poison_pruned(model, masks, block)
    expected = _live_norm(model, masks, block)
    norm = optimizer.grad_norm()
    assert norm.dtype == torch.float32 and norm.device.type == device
    assert float(norm) == pytest.approx(expected, rel=1e-5)
    assert float(optimizer.clip_grad_norm_(0.1)) == pytest.approx(expected, rel=1e-5)
    assert not optimizer.state or all("exp_avg" not in s for s in optimizer.state.values())  # measuring makes none


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_grad_norm_of_float64_parameters(impl):
    """float64 runs on the torch backend (auto falls back to it); its norm is summed in float64, returned in fp32."""
    model, masks = _model("cpu", torch.float64)
    optimizer = _optimizer(model, masks, impl)
    _backward(model, seed=2)
    _poison_pruned(model, masks)
    norm = optimizer.grad_norm()
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(_live_norm(model, masks), rel=1e-6)


@pytest.mark.parametrize("impl,device", CASES)
def test_clipped_steps_follow_torch_adamw_on_clipped_gradients(impl, device):
    """Eight steps, each clipped (max_norm 0.005, under every norm here) or not (max_norm 1e3); NaN and inf in every
    pruned block's gradient. The twin is torch.optim.AdamW on the same gradients, masked and multiplied by torch's
    coefficient computed from the float64 norm. Pruned blocks stay exactly zero."""
    model, masks = _model(device)
    twin = copy.deepcopy(model)
    ours = _optimizer(model, masks, impl)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(8):
        max_norm = 0.005 if step % 3 != 2 else 1e3
        for m in (model, twin):
            m.zero_grad()
            _backward(m, seed=step, scale=1.0 + step)
        coefficient = min(1.0, max_norm / (_live_norm(twin, masks) + 1e-6))
        assert (coefficient < 1.0) == (max_norm < 1.0)
        for name, p in twin.named_parameters():
            p.grad.mul_(coefficient).masked_fill_(~_live(name, masks, p, 16), 0.0)
        _poison_pruned(model, masks)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = ours.clip_grad_norm_(max_norm)
        assert float(norm) == pytest.approx(_live_norm(model, masks), rel=1e-5)
        ours.step()
        theirs.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, msg=f"{name} after step {step + 1}")
            if name in masks:
                assert torch.equal(block_mask_from_zeros(a.detach()), masks[name]), name
            live = _live(name, masks, a, 16)
            if impl in ("torch", "triton"):  # scaled as read: the gradients are as they were
                assert torch.equal(a.grad[live], grads[name][live]), name
            else:  # the compiled kernels take no scale: the gradients were multiplied in place
                torch.testing.assert_close(a.grad[live], grads[name][live] * coefficient, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl,device", CASES[:2])
def test_a_clip_applies_to_the_next_step_only(impl, device):
    """zero_grad() drops a pending clip, max_norm=inf only measures, a step takes the clip and the next step does
    not see it. The twin clips by hand: its gradients multiplied by torch's coefficient of the returned norm."""
    model, masks = _model(device)
    twin = copy.deepcopy(model)
    ours, theirs = _optimizer(model, masks, impl), _optimizer(twin, masks, impl)

    def backward(seed):
        for m in (model, twin):
            m.zero_grad()
            _backward(m, seed)

    def compare(exact, what):
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            if exact:
                assert torch.equal(a, b), f"{name}: {what}"
            else:
                assert_close_verbose(a, b, atol=1e-7, rtol=1e-6, msg=f"{name}: {what}")

    backward(0)
    ours.clip_grad_norm_(1e-4)
    ours.zero_grad()  # drops it
    backward(1)
    ours.step(), theirs.step()
    compare(True, "a clip before zero_grad() applied")
    backward(2)
    ours.clip_grad_norm_(math.inf)
    ours.step(), theirs.step()
    compare(True, "clip_grad_norm_(inf) scaled the step")
    backward(3)
    norm = float(ours.clip_grad_norm_(1e-4))
    for p in twin.parameters():
        p.grad.mul_(min(1.0, 1e-4 / (norm + 1e-6)))
    ours.step(), theirs.step()
    compare(False, "the clipped step")
    for seed in (4, 5):
        backward(seed)
        ours.step(), theirs.step()
        compare(False, "a step after the clipped one")


# ------------------------------------------------------------------------------------------- FSDP2 row shards
def _ragged_model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.GELU(), torch.nn.Linear(70, 37))
    gen = torch.Generator().manual_seed(1)
    for lin in (model[0], model[2]):
        apply_block_mask_(lin.weight.data, random_block_mask(lin.weight.shape, 0.4, generator=gen))
    return model, torch.randn(6, 40, generator=gen)


def _fsdp_worker(rank, world, port, out_dir):
    """Rank `rank` of 2: FSDP2 row shards of 70 rows (rank 1 starts three rows into a block row), NaN in the pruned
    blocks of its gradient rows, then clip_grad_norm_ and a step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sparse_adamw.dtensor import local_tensor, row_offset

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, batch = _ragged_model_and_batch()
    for lin in (model[0], model[2]):
        fully_shard(lin)
    fully_shard(model)
    optimizer = SparseAdamW(model.parameters(), lr=1e-2, masks="auto")
    model(batch).square().sum().backward()
    for p in model.parameters():
        mask = optimizer.state[p].get("block_mask")
        if mask is not None:
            local, offset = local_tensor(p.grad), row_offset(p.grad)
            pruned = ~expand_block_mask(mask, p.shape)[offset:offset + local.shape[0]]
            local.masked_fill_(pruned, math.nan)
    norm = optimizer.clip_grad_norm_(0.5)
    optimizer.step()
    params = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save({"norm": norm, "params": params}, os.path.join(out_dir, "clip.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_distributed: no interpreter teardown after the work is saved


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clipping_on_fsdp2_shards_is_one_process_clipping(tmp_path):
    """Each rank sums its rows' live blocks, an all-reduce joins them: the one-process norm, and after the clipped
    step the weights of the one-process run (which the tests above hold to torch.optim.AdamW)."""
    spawn_ranks(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    result = torch.load(tmp_path / "clip.pt", weights_only=True)
    model, batch = _ragged_model_and_batch()
    optimizer = SparseAdamW(model.parameters(), lr=1e-2, masks="auto")
    model(batch).square().sum().backward()
    masks = {name: optimizer.state[p]["block_mask"] for name, p in model.named_parameters()
             if "block_mask" in optimizer.state[p]}
    expected = _live_norm(model, masks)
    assert expected > 0.5
    assert float(result["norm"]) == pytest.approx(expected, rel=1e-6)
    optimizer.clip_grad_norm_(0.5)
    optimizer.step()
    for (name, p), got in zip(model.named_parameters(), result["params"]):
        assert_close_verbose(got, p, atol=1e-7, rtol=1e-6, msg=name)
