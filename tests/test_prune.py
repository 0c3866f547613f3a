import json

import pytest
import torch

from pipeline_helpers import command_help, save_tiny_model, tiny_tokenizer, write_text_file
from sparse_adamw import check_sparsity
from sparse_adamw.masks import MASKS_FILE, block_mask_from_zeros, expand_block_mask, load_masks
from sparse_adamw.pipeline.prune import REPORT_FILE, block_scores, blocks_per_row, main, prune_model, select_block_mask
from sparse_adamw.sparsity import decoder_layers


def _calibration(n=4, seq=32, vocab=256, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _prunable(model):
    return {
        name: p for name, p in model.named_parameters()
        if name.startswith("model.layers.") and name.endswith("proj.weight")
    }


def test_blocks_per_row_rounds_half_up():
    assert blocks_per_row(36, 0.2) == 7  # SmolLM2's 576 columns: 19.44%, not 20%
    assert blocks_per_row(96, 0.2) == 19
    assert blocks_per_row(4, 0.5) == 2
    assert blocks_per_row(10, 0.25) == 3  # 2.5 rounds up
    assert blocks_per_row(4, 0.0) == 0 and blocks_per_row(4, 1.0) == 4


def test_block_scores_match_an_explicit_loop():
    weight = torch.randn(40, 24)  # partial edge blocks in both dimensions
    norms = torch.rand(24) * 5
    for column_norms in (None, norms):
        scores = block_scores(weight, (16, 8), column_norms)
        assert scores.shape == (3, 3)
        metric = weight.abs() * (1 if column_norms is None else norms)
        for i in range(3):
            for j in range(3):
                expected = metric[16 * i:16 * (i + 1), 8 * j:8 * (j + 1)].sum()
                torch.testing.assert_close(scores[i, j], expected)


def test_select_block_mask_prunes_the_lowest_blocks_of_each_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 0.5]])
    mask = select_block_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, True, True, False]]
    with pytest.raises(ValueError):
        select_block_mask(scores, 1.5)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_pruning_hits_the_sparsity_exactly_in_16x16_blocks(tiny_llama, method, sparsity):
    model = tiny_llama()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    masks = prune_model(model, method, sparsity, 16, calibration=_calibration(), batch_size=3, progress=False)

    prunable = _prunable(model)
    assert set(masks) == set(prunable) and len(masks) == 2 * 7
    pruned_blocks = total_blocks = 0
    for name, weight in prunable.items():
        mask = masks[name]
        rows, cols = weight.shape
        assert mask.shape == (rows // 16, cols // 16) and mask.dtype == torch.bool
        # Every block-row prunes the same number of blocks.
        assert (~mask).sum(dim=1).tolist() == [round(sparsity * cols / 16)] * (rows // 16)
        dense = expand_block_mask(mask, weight.shape, 16)
        w = weight.detach()
        assert torch.equal(w[~dense], torch.zeros((~dense).sum()))
        assert not torch.signbit(w[~dense]).any(), f"{name}: pruned entries must be +0.0"
        assert torch.equal(w[dense], original[name][dense]), f"{name}: a live block changed"
        assert torch.equal(block_mask_from_zeros(w, 16), mask)
        pruned_blocks += (~mask).sum().item()
        total_blocks += mask.numel()
    assert pruned_blocks == sparsity * total_blocks
    assert check_sparsity(model, verbose=False) == sparsity
    for name, p in model.named_parameters():
        if name not in prunable:
            assert torch.equal(p.detach(), original[name]), f"{name} must stay dense and unchanged"


def _make_block_column_zero_loud(model):
    """Layer 0: input features 0-15 of q/k/v get 50x larger activations but 10x smaller q_proj weights."""
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        layer.input_layernorm.weight[:16] = 50.0
        layer.self_attn.q_proj.weight[:, :16] *= 0.1
    return "model.layers.0.self_attn.q_proj.weight"


def test_wanda_keeps_a_block_that_magnitude_prunes(tiny_llama):
    masks = {}
    for method in ("magnitude", "wanda"):
        model = tiny_llama()
        name = _make_block_column_zero_loud(model)
        masks[method] = prune_model(model, method, 0.25, 16, _calibration(), progress=False)[name]
    # 4 block columns at 25%: one block per block-row goes. Magnitude picks the small weights of column 0.
    assert masks["magnitude"][:, 0].logical_not().all()
    assert masks["wanda"][:, 0].all()
    assert (~masks["wanda"]).sum(dim=1).tolist() == [1] * 4


def test_wanda_calibrates_each_layer_on_the_pruned_outputs_of_the_previous_one(tiny_llama, monkeypatch):
    import sparse_adamw.pipeline.prune as prune

    norms_seen = {}

    def recording_block_scores(weight, prune_block=(16, 16), column_norms=None):
        norms_seen[id(weight)] = column_norms.clone()
        return block_scores(weight, prune_block, column_norms)

    monkeypatch.setattr(prune, "block_scores", recording_block_scores)
    model, dense = tiny_llama(), tiny_llama()
    calibration = _calibration(n=5)
    prune_model(model, "wanda", 0.5, 16, calibration, batch_size=2, progress=False)
    with torch.no_grad():
        pruned_hidden = model(calibration, output_hidden_states=True).hidden_states
        dense_hidden = dense(calibration, output_hidden_states=True).hidden_states
    for i, layer in enumerate(decoder_layers(model)):
        seen = norms_seen[id(layer.self_attn.q_proj.weight)]
        # hidden[i] is the input of layer i; with the model pruned, it went through the pruned earlier layers.
        expected = layer.input_layernorm(pruned_hidden[i]).pow(2).sum(dim=(0, 1)).sqrt()
        torch.testing.assert_close(seen, expected, msg=f"layer {i}")
    unpruned = decoder_layers(dense)[1].input_layernorm(dense_hidden[1]).pow(2).sum(dim=(0, 1)).sqrt()
    assert not torch.allclose(norms_seen[id(decoder_layers(model)[1].self_attn.q_proj.weight)], unpruned)


def test_prune_cli_help():
    out = command_help("sparse_adamw.pipeline.prune")
    for flag in ("--model", "--output_dir", "--sparsity", "--method", "--nsamples", "--prune_block", "--block_size",
                 "--dataset", "--dataset_path", "--eval", "--device", "--seed", "block-row"):
        assert flag in out


def test_prune_cli_rejects_a_bad_block_shape(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--prune_block", "16by16"])
    assert info.value.code == 2
    assert "16x16" in capsys.readouterr().err


def test_prune_cli_end_to_end(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "tiny", tiny_llama(), tiny_tokenizer())
    write_text_file(tmp_path / "corpus.txt", n=400)
    out = tmp_path / "pruned"
    code = main([
        "--model", str(model_dir), "--dataset_path", str(tmp_path / "corpus.txt"), "--output_dir", str(out),
        "--sparsity", "0.5", "--nsamples", "4", "--block_size", "32", "--eval", "--max_eval_windows", "3",
        "--device", "cpu",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first 3 of" in printed and "perplexity after pruning" in printed

    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "wanda" and report["prune_block"] == [16, 16]
    assert report["overall_sparsity"] == 0.5
    assert report["calibration"]["nsamples"] == 4
    assert len(report["layers"]) == 14 and all(v == 0.5 for v in report["layers"].values())
    ppl = report["perplexity"]
    assert 1 < ppl["before"] < float("inf") and 1 < ppl["after"] < float("inf")
    assert ppl["before"] != ppl["after"]
    assert {"load_s", "prune_s", "eval_before_s", "eval_after_s", "save_s"} <= set(report["timings_s"])

    pruned = AutoModelForCausalLM.from_pretrained(str(out))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert check_sparsity(pruned, verbose=False) == 0.5
    masks, block = load_masks(out / MASKS_FILE)
    assert block == (16, 16)
    params = dict(pruned.named_parameters())
    assert set(masks) == set(_prunable(pruned))
    for name, mask in masks.items():
        assert torch.equal(block_mask_from_zeros(params[name], block), mask)
