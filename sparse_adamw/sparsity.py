"""Sparsity checks, as the user's Wanda scripts compute them: the decoder layers' Linear weights.

`check_sparsity` counts exact zeros, so it also counts live weights that happen to be zero (a quantized checkpoint
such as the Q4_1 SmolLM2 has tens of thousands); training moves those, as it should. `pruned_fraction` counts the
weights inside the blocks that the masks mark pruned: the number that SparseAdamW keeps fixed.
"""
from __future__ import annotations

from typing import Dict

import torch

from .masks import BlockSize, normalize_block_size


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """`model.model.layers` of a decoder-only (LLaMA-style) model, or a ValueError that says what was expected."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(
            f"expected a decoder-only model with `model.model.layers` (LLaMA-style); {type(model).__name__} has none"
        )
    return layers


def find_linears(layer: torch.nn.Module) -> Dict[str, torch.nn.Linear]:
    """Every nn.Linear inside a decoder layer, by its name within the layer (e.g. `self_attn.q_proj`)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def sparsity_report(model: torch.nn.Module) -> Dict[str, float]:
    """Fraction of exact zeros per Linear weight of every decoder layer, keyed `layers.<i>.<name>`."""
    report = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in find_linears(layer).items():
            w = module.weight.detach()
            report[f"layers.{i}.{name}"] = (w == 0).sum().item() / w.numel()
    return report


@torch.no_grad()
def check_sparsity(model: torch.nn.Module, verbose: bool = True) -> float:
    """Fraction of exact zeros over all Linear weights of `model.model.layers`; prints one line per layer."""
    zeros = total = 0
    for i, layer in enumerate(decoder_layers(model)):
        layer_zeros = layer_total = 0
        for module in find_linears(layer).values():
            w = module.weight.detach()
            layer_zeros += (w == 0).sum().item()
            layer_total += w.numel()
        if verbose:
            print(f"layer {i} sparsity {layer_zeros / max(layer_total, 1):.6f}")
        zeros += layer_zeros
        total += layer_total
    return zeros / max(total, 1)


def pruned_elements(mask: torch.Tensor, shape, block_size: BlockSize) -> int:
    """Elements of a (rows, cols) weight inside the blocks `mask` marks pruned (edge blocks count their part)."""
    bh, bw = normalize_block_size(block_size)
    rows, cols = shape
    heights = (rows - torch.arange(mask.shape[0]) * bh).clamp(max=bh)
    widths = (cols - torch.arange(mask.shape[1]) * bw).clamp(max=bw)
    return int(heights @ (~mask.cpu()).long() @ widths)


def pruned_fraction(model: torch.nn.Module, masks: Dict[str, torch.Tensor], block_size: BlockSize) -> float:
    """Fraction of the decoder layers' Linear weights that lie in blocks `masks` ({parameter name: mask}) prune.

    Read from the masks alone, no pass over the weights: where the masks have been verified against the weights
    (SparseTrainer does at the start and end of training), those weights are exactly zero.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    pruned = total = 0
    for layer in decoder_layers(model):
        for linear in find_linears(layer).values():
            w = linear.weight
            total += w.numel()
            mask = masks.get(names.get(id(w), ""))
            if mask is not None:
                pruned += pruned_elements(mask, w.shape, block_size)
    return pruned / max(total, 1)
