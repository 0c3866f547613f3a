"""Sparsity checks, as the user's Wanda scripts compute them: the decoder layers' Linear weights.

`check_sparsity` counts exact zeros, so it also counts live weights that happen to be zero (a quantized checkpoint
such as the Q4_1 SmolLM2 has tens of thousands); training moves those, as it should. `pruned_fraction` counts the
weights inside the blocks that the masks mark pruned: the number that SparseAdamW keeps fixed.

The block masks of a pruned model come from its zeros (`linear_block_masks`), and the checks that its pruned blocks
are still exactly zero raise `SparsityViolation`: against masks read from a file (`check_given_masks`), and against
the masks an optimizer holds (`verify_block_sparsity`, FSDP2 shards included).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .dtensor import full_tensor, is_dtensor
from .masks import BlockSize, block_mask_from_zeros, leaked_blocks, normalize_block_size, pruned_block_leaks


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


class SparsityViolation(RuntimeError):
    """A block that the masks mark pruned holds a nonzero."""


def check_given_masks(weights: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], block_size: BlockSize,
                      source: str) -> None:
    """Masks read from `source` must fit `weights` (ValueError otherwise) and agree with their zeros
    (SparsityViolation otherwise)."""
    leaked = pruned_block_leaks(weights, masks, block_size, source, whole=full_tensor)
    if leaked:
        raise SparsityViolation(f"the model has nonzeros in blocks that {source} marks pruned (is it the model those "
                                "masks were made for?): " + "; ".join(leaked[:10]))


@torch.no_grad()
def linear_block_masks(model: torch.nn.Module, block_size: BlockSize = 16) -> Dict[str, torch.Tensor]:
    """{parameter name: bool block mask} for every nn.Linear weight with at least one all-zero block.

    These are the weights that pruning zeroes and `check_sparsity` counts; embeddings, norms and dense weights get
    no mask (plain AdamW).
    """
    block = normalize_block_size(block_size)
    masks = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dim() == 2:
            # An FSDP2 (DTensor) weight is gathered whole: every rank gets the same mask.
            mask = block_mask_from_zeros(full_tensor(module.weight), block)
            if not bool(mask.all()):
                masks[f"{module_name}.weight" if module_name else "weight"] = mask
    return masks


@torch.no_grad()
def verify_block_sparsity(optimizer: torch.optim.Optimizer, names: Optional[Dict[int, str]] = None,
                          when: str = "") -> int:
    """Raise SparsityViolation if any block that `optimizer`'s masks mark pruned holds a nonzero.

    `names` maps id(param) to a name for the message. Returns the number of masked parameters checked. With
    FSDP2 (DTensor) parameters every rank checks its own rows and one all-reduce joins the answers, so every
    rank must call this, and every rank raises alike.
    """
    bad, checked, leaks = [], 0, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            mask = optimizer.state.get(p, {}).get("block_mask")
            if mask is None:
                continue
            checked += 1
            leaks.append((p, mask, leaked_blocks(p, mask, group["block_size"])))  # this rank's rows
    sharded = [p for p, _, _ in leaks if is_dtensor(p)]
    if sharded and torch.distributed.is_initialized():
        flat = torch.cat([leak.reshape(-1) for _, _, leak in leaks]).to(torch.uint8)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
        joined = flat.bool().split([leak.numel() for _, _, leak in leaks])
        leaks = [(p, mask, j.reshape(leak.shape)) for (p, mask, leak), j in zip(leaks, joined)]
    for p, mask, leak in leaks:
        leaked = int(leak.sum())
        if leaked:
            name = (names or {}).get(id(p), f"parameter of shape {tuple(p.shape)}")
            bad.append(f"{name}: {leaked} of {int((~mask).sum())} pruned blocks")
    if bad:
        where = f" {when}" if when else ""
        raise SparsityViolation(f"pruned blocks became nonzero{where}: " + "; ".join(bad[:10])
                                + (f"; and {len(bad) - 10} more parameters" if len(bad) > 10 else ""))
    return checked
