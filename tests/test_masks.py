import pytest
import torch

from sparse_adamw.masks import MASKS_FILE, load_masks, normalize_block_size, save_masks

from tests.utils import kron_mask


def test_block_shapes_from_the_command_line():
    assert normalize_block_size("16") == (16, 16)
    assert normalize_block_size("16x8") == (16, 8)
    assert normalize_block_size("32X32") == (32, 32)
    assert normalize_block_size(8) == (8, 8)
    assert normalize_block_size((4, 2)) == (4, 2)
    for bad in ("16x", "axb", "16x16x16", "0x16", 0, (3, 0), True):
        with pytest.raises(ValueError):
            normalize_block_size(bad)


def test_masks_file_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(3)
    masks = {f"layers.{i}.weight": torch.rand(5, 3, generator=generator) > 0.4 for i in range(3)}
    path = save_masks(tmp_path / "sub" / MASKS_FILE, masks, (16, 32))
    loaded, block = load_masks(path)
    assert block == (16, 32)
    assert loaded.keys() == masks.keys()
    for name in masks:
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], masks[name])
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a block masks file"):
        load_masks(tmp_path / "other.pt")


def _leaked_by_hand(weight, mask, bh, bw):
    """The oracle: block by block, in plain Python over the weight's rows and columns (the last blocks cut short
    where the shape is not a multiple of the block), which blocks the mask marks pruned yet hold a nonzero."""
    rows, cols = weight.shape
    values = weight.tolist()
    leaked = set()
    for br in range((rows + bh - 1) // bh):
        for bc in range((cols + bw - 1) // bw):
            cells = [values[r][c] for r in range(br * bh, min(rows, (br + 1) * bh))
                     for c in range(bc * bw, min(cols, (bc + 1) * bw))]
            if not mask[br][bc] and any(v != 0 for v in cells):
                leaked.add((br, bc))
    return leaked


@pytest.mark.parametrize("shape, where", [
    ((40, 48), (39, 20)),  # the last row of the last, partial block-row (rows 32..39)
    ((40, 48), (32, 0)),  # its first row
    ((48, 40), (7, 39)),  # the last column of the last, partial block-column (columns 32..39)
    ((40, 40), (39, 39)),  # the partial corner block
], ids=["last-row", "first-row-of-last-block-row", "last-column", "corner"])
def test_leaked_blocks_sees_a_leak_in_the_last_partial_block_row_and_column(shape, where):
    """A weight whose rows (or columns) are not a multiple of 16: a nonzero in a pruned block of the last, partial
    block-row or block-column is reported, that block alone, as the plain loop over blocks finds it."""
    from sparse_adamw.masks import leaked_blocks

    rows, cols = shape
    generator = torch.Generator().manual_seed(0)
    grid = ((rows + 15) // 16, (cols + 15) // 16)
    mask = torch.rand(grid, generator=generator) > 0.5
    mask[where[0] // 16, where[1] // 16] = False  # the block of the leak is pruned
    mask[0, 1] = True  # and some other block is live
    weight = torch.randn(shape, generator=generator)
    for br in range(grid[0]):
        for bc in range(grid[1]):
            if not mask[br, bc]:
                weight[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16] = 0.0
    assert not leaked_blocks(weight, mask, 16).any()
    assert _leaked_by_hand(weight, mask.tolist(), 16, 16) == set()

    weight[where] = 1e-3
    found = leaked_blocks(weight, mask, 16)
    assert found.shape == grid and found.dtype == torch.bool
    expected = _leaked_by_hand(weight, mask.tolist(), 16, 16)
    assert expected == {(where[0] // 16, where[1] // 16)}
    assert {tuple(i) for i in found.nonzero().tolist()} == expected


def test_pruned_block_leaks_counts_leaks_per_weight_and_refuses_masks_of_another_model():
    """The one check behind a masks file, a resumed checkpoint and a merged adapter: each weight's count of pruned
    blocks holding a nonzero (the plain loop's count), and ValueError for a mask naming a weight the model lacks or
    of another grid."""
    from sparse_adamw.masks import pruned_block_leaks

    generator = torch.Generator().manual_seed(3)
    weights, masks = {}, {}
    for name, shape, bh, bw in (("a", (40, 37), 8, 16), ("b", (24, 64), 8, 16)):
        grid = ((shape[0] + bh - 1) // bh, (shape[1] + bw - 1) // bw)
        masks[name] = torch.rand(grid, generator=generator) > 0.4
        weights[name] = torch.randn(shape, generator=generator)
    counts = {name: len(_leaked_by_hand(weights[name], masks[name].tolist(), 8, 16)) for name in weights}
    assert all(counts.values())  # random weights leak into every pruned block
    assert pruned_block_leaks(weights, masks, (8, 16)) == [f"{n}: {counts[n]} blocks" for n in ("a", "b")]
    for name, mask in masks.items():  # zero the pruned blocks: nothing leaks
        weights[name] *= torch.from_numpy(kron_mask(mask, weights[name].shape, 8, 16)).float()
    assert pruned_block_leaks(weights, masks, "8x16") == []
    with pytest.raises(ValueError, match=r"my.pt names 1 parameter\(s\) the model does not have, e.g. c;"):
        pruned_block_leaks(weights, {**masks, "c": masks["a"]}, (8, 16), "my.pt")
    with pytest.raises(ValueError, match=r"the mask of b has shape \(2, 4\), which does not fit"):
        pruned_block_leaks(weights, {"b": masks["b"][:2]}, (8, 16), "my.pt")
