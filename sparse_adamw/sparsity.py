"""Sparsity checks, as the user's Wanda scripts compute them: exact zeros in the decoder layers' Linear weights."""
from __future__ import annotations

from typing import Dict

import torch


def _decoder_layers(model: torch.nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"check_sparsity expects a decoder-only model with `model.model.layers` (LLaMA-style); "
            f"{type(model).__name__} has none"
        )
    return layers


def sparsity_report(model: torch.nn.Module) -> Dict[str, float]:
    """Fraction of exact zeros per Linear weight of every decoder layer, keyed `layers.<i>.<name>`."""
    report = {}
    for i, layer in enumerate(_decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.detach()
                report[f"layers.{i}.{name}"] = (w == 0).sum().item() / w.numel()
    return report


@torch.no_grad()
def check_sparsity(model: torch.nn.Module, verbose: bool = True) -> float:
    """Fraction of exact zeros over all Linear weights of `model.model.layers`; prints one line per layer."""
    zeros = total = 0
    for i, layer in enumerate(_decoder_layers(model)):
        layer_zeros = layer_total = 0
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.detach()
                layer_zeros += (w == 0).sum().item()
                layer_total += w.numel()
        if verbose:
            print(f"layer {i} sparsity {layer_zeros / max(layer_total, 1):.6f}")
        zeros += layer_zeros
        total += layer_total
    return zeros / max(total, 1)
