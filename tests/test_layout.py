"""The compact state format against a construction written from the mask alone: slot s holds the s-th live block
in row-major block order. Nothing here goes through sparse_adamw.layout's own index maps."""
import pytest
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask
from sparse_adamw.layout import compact_to_dense, dense_to_compact
from tests.test_kernels import BACKENDS, DEVICES, _skip_unrunnable


def _live_blocks_in_row_major_order(dense: torch.Tensor, mask: torch.Tensor, block):
    """The live blocks of `dense`, taken one by one, row by row: a list of (h, w) pieces (smaller at the edges)."""
    bh, bw = block
    return [dense[br * bh:(br + 1) * bh, bc * bw:(bc + 1) * bw]
            for br in range(mask.shape[0]) for bc in range(mask.shape[1]) if mask[br, bc]]


@pytest.mark.parametrize("shape,block", [((75, 93), (16, 16)), ((40, 21), (5, 3)), ((64, 32), (16, 16))])
def test_compact_format_is_row_major_live_blocks(shape, block):
    gen = torch.Generator().manual_seed(3)
    mask = random_block_mask(shape, 0.4, block, generator=gen)
    dense = torch.randn(shape, generator=gen)
    pieces = _live_blocks_in_row_major_order(dense, mask, block)
    compact = dense_to_compact(dense, mask, block)
    assert compact.shape == (len(pieces), *block)
    slots = torch.zeros(compact.shape)
    for s, piece in enumerate(pieces):
        h, w = piece.shape
        assert torch.equal(compact[s, :h, :w], piece), f"slot {s}"
        slots[s, :h, :w] = piece
    assert torch.equal(compact_to_dense(slots, mask, shape, block), apply_block_mask_(dense.clone(), mask, block))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_every_backend_writes_slot_s_to_the_s_th_live_block(device, impl):
    """After one step from zero state, exp_avg = (1 - beta1) * grad: each backend's raw compact state must hold the
    gradient's live blocks in row-major order."""
    _skip_unrunnable(impl, device)
    shape, block, beta1 = (70, 90), (16, 16), 0.75
    gen = torch.Generator().manual_seed(11)
    mask = random_block_mask(shape, 0.5, block, generator=gen)
    param = apply_block_mask_(torch.randn(shape, generator=gen), mask).to(device)
    grad = torch.randn(shape, generator=gen)
    opt = SparseAdamW([param], betas=(beta1, 0.999), masks={param: mask.to(device)}, impl=impl)
    param.grad = grad.to(device)
    opt.step()
    raw = opt.state[param]["exp_avg"].cpu()
    pieces = _live_blocks_in_row_major_order((1 - beta1) * grad, mask, block)
    assert raw.shape == (len(pieces), *block)
    for s, piece in enumerate(pieces):
        h, w = piece.shape
        torch.testing.assert_close(raw[s, :h, :w], piece, rtol=1e-6, atol=1e-7, msg=f"{impl}: slot {s}")
