"""Perplexity and sparsity of a causal LM; `python -m sparse_adamw.pipeline.evaluate --help`.

Perplexity is Wanda's eval_ppl: the eval split is tokenized as one text and cut into non-overlapping windows of
`block_size` tokens (the tail is dropped); every window is scored on its own, and the result is
exp(total negative log-likelihood / number of predicted tokens), which equals exp(mean of the per-window mean
losses). The split is wikitext-2's test split for `--dataset wikitext`, otherwise the validation split (for the
offline default corpus, the ~5% of articles whose title hash falls below 0.05).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..sparsity import check_sparsity, sparsity_report
from . import held_out
from .cli import (CPU_OOD_WINDOWS, DEFAULT_OOD_WINDOWS, add_eval_arguments, default_ood_windows,
                  default_pruned_model, load_for_eval, parse_eval_command, timed)
from .models import DEFAULT_MODEL

# Wanda's zero-shot suite.
ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "arc_easy", "openbookqa")
LM_EVAL_INSTALL = 'pip install "lm-eval[hf]"'


def _check_windows(blocks: torch.Tensor, batch_size: int) -> None:
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be [n >= 1, seq >= 2] token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@torch.no_grad()
def negative_log_likelihood(
    model,
    blocks: torch.Tensor,
    batch_size: int = 4,
    device=None,
    progress: bool = True,
    desc: str = "perplexity",
) -> Tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over [n, seq] token windows, each scored on its own;
    logits in fp32."""
    from tqdm.auto import tqdm

    _check_windows(blocks, batch_size)
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in tqdm(blocks.split(batch_size), desc=desc, disable=not progress, unit="batch"):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return nll, count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over [n, seq] token windows, each scored on its own; logits in fp32."""
    nll, count = negative_log_likelihood(model, blocks, batch_size, device, progress, desc)
    return math.exp(nll / count)


def held_out_perplexity(model, windows: Dict[str, torch.Tensor], batch_size: int = 4, device=None,
                        progress: bool = True) -> Dict[str, float]:
    """{"all": ..., kind: ...}: the perplexity over the held-out windows (held_out.py), all together and by kind."""
    return held_out.perplexity_by_kind(
        lambda kind, blocks: negative_log_likelihood(model, blocks, batch_size, device, progress, f"held-out {kind}"),
        windows)


def require_lm_eval() -> None:
    """Raise a RuntimeError that says how to install lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"--eval_zero_shot needs lm-eval, which is not installed: {LM_EVAL_INSTALL}") from err


def eval_zero_shot(model, tokenizer, tasks: Sequence[str] = ZERO_SHOT_TASKS, batch_size: int = 4) -> dict:
    """Zero-shot accuracy per task through lm-eval (its tasks download their data from the hub)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0)
    return results["results"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_adamw.pipeline.evaluate",
        description=(
            "Perplexity over non-overlapping windows (as Wanda's eval_ppl) and the sparsity of the decoder "
            "layers' Linear weights; optionally lm-eval zero-shot accuracy. Runs offline with no arguments "
            "after `python -m sparse_adamw.pipeline.prune`."
        ),
    )
    parser.add_argument(
        "--model", default=str(default_pruned_model()),
        help=f"a saved model directory, a .gguf file, or {DEFAULT_MODEL!r} for the dense packaged SmolLM2-135M "
        "(default: the output of `python -m sparse_adamw.pipeline.prune` with its defaults)",
    )
    add_eval_arguments(parser)
    parser.add_argument(
        "--ood_windows", type=int, default=None,
        help=f"also the perplexity on N windows of held-out text unlike the corpus (novels, plays, speeches, "
        f"recipes: see held_out.py), shared equally by the kinds; 0 = off (default {DEFAULT_OOD_WINDOWS}, or "
        f"{CPU_OOD_WINDOWS} on CPU)",
    )
    parser.add_argument("--eval_zero_shot", action="store_true", help=f"also run lm-eval ({LM_EVAL_INSTALL})")
    parser.add_argument(
        "--tasks", default=",".join(ZERO_SHOT_TASKS), help="comma-separated lm-eval tasks (default: Wanda's seven)"
    )
    parser.add_argument(
        "--per_layer", action="store_true",
        help="also print the sparsity of every decoder layer (the JSON file always has every weight's)",
    )
    parser.add_argument("--output_json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_eval_command(parser, argv)
    if args.eval_zero_shot:
        try:
            require_lm_eval()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.model == parser.get_default("model") and not Path(args.model).exists():
        parser.error(
            f"no pruned model at {args.model}: run `python -m sparse_adamw.pipeline.prune` first, or pass "
            f"--model {DEFAULT_MODEL} for the dense packaged model, or --model DIR"
        )
    if args.ood_windows is None:
        args.ood_windows = default_ood_windows(args.device)
    if args.ood_windows < 0:
        parser.error(f"--ood_windows must be >= 0, got {args.ood_windows}")
    timings: Dict[str, float] = {}
    loaded = load_for_eval(parser, args, timings,
                           more=lambda tokenizer: held_out.load_or_note(tokenizer, args.block_size, args.ood_windows))
    print(f"evaluating: {loaded.evaluated}")
    with timed(timings, "perplexity_s"):
        ppl = perplexity(loaded.model, loaded.windows, args.batch_size, args.device)
    print(f"perplexity: {ppl:.4f} ({timings['perplexity_s']:.1f} s)")
    ood_windows, ood_what = loaded.extra
    ood = None
    print(f"out of domain: {ood_what}")
    if ood_windows is not None:
        with timed(timings, "perplexity_ood_s"):
            ood = held_out_perplexity(loaded.model, ood_windows, args.batch_size, args.device)
        print(f"out-of-domain perplexity: {ood['all']:.4f} ("
              + ", ".join(f"{kind} {value:.2f}" for kind, value in ood.items() if kind != "all")
              + f"; {timings['perplexity_ood_s']:.1f} s)")
    sparsity = check_sparsity(loaded.model, verbose=args.per_layer)  # one line per layer: 30 for SmolLM2
    print(f"sparsity (exact zeros in the decoder layers' Linear weights): {sparsity:.6f}")
    results = {
        "model": args.model, "evaluated": loaded.evaluated, "perplexity": ppl, "perplexity_s": timings["perplexity_s"],
        "sparsity": sparsity, "device": str(args.device), "dtype": args.dtype,
        "out_of_domain": None if ood is None else {"evaluated": ood_what, "kinds": held_out.kinds_described(),
                                                   "perplexity": ood,
                                                   "perplexity_s": timings["perplexity_ood_s"]},
    }
    if args.eval_zero_shot:
        tasks = [t for t in args.tasks.split(",") if t]
        results["zero_shot"] = eval_zero_shot(loaded.model, loaded.tokenizer, tasks, args.batch_size)
        print(json.dumps(results["zero_shot"], indent=2, default=str))
    if args.output_json:
        # One more pass over the weights' zeros (no forward): cheap beside the perplexity.
        results["sparsity_per_weight"] = sparsity_report(loaded.model)
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
