import pytest
import torch

from sparse_adamw.masks import MASKS_FILE, load_masks, normalize_block_size, save_masks


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
