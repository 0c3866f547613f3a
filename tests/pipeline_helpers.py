"""Local stand-ins for the pipeline tests: a word-level tokenizer and a synthetic corpus, no hub; a command's help."""
import random
import subprocess
import sys

WORDS = [f"w{i}" for i in range(240)]
SPECIALS = ["[UNK]", "<s>", "</s>"]


def tiny_tokenizer():
    """A WordLevel tokenizer over WORDS (ids < 256, so it fits tiny_llama's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def paragraphs(n, words_per_paragraph=40, seed=0):
    """`n` distinct paragraphs of random WORDS."""
    rng = random.Random(seed)
    return [f"p{i} " + " ".join(rng.choice(WORDS) for _ in range(words_per_paragraph)) for i in range(n)]


def write_text_file(path, n=200, seed=0):
    """A .txt corpus of `n` paragraphs separated by blank lines; returns the paragraphs."""
    texts = paragraphs(n, seed=seed)
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return texts


def save_tiny_model(directory, model, tokenizer):
    from sparse_adamw.pipeline.models import save_model

    return save_model(model, tokenizer, directory)


def command_help(module):
    """The stdout of `python -m <module> --help`, run in a subprocess, which must succeed."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout
