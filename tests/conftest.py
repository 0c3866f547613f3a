import os
import random
import sys
import tempfile

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the H100 with `pytest -m gpu`)")
    config.addinivalue_line("markers", "slow: takes more than a minute on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _subprocess_tmpdir(tmp_path_factory):
    """Child processes make their temporary files (torchrun's /tmp/torchelastic_* folders, spawned workers')
    inside this session's pytest directory, which pytest removes after a passing run (pyproject.toml)."""
    path = tmp_path_factory.mktemp("tmp")  # pytest's own base directory is fixed first, under the real TMPDIR
    tempfile.gettempdir()  # and so is this process's: tempfile keeps its first choice
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    """A test that fails while a finetune_helpers.Child still runs (the other run of a pair, say) would leave it
    running, and taking a core, for the rest of the session: kill its process group."""
    yield
    helpers = sys.modules.get("finetune_helpers")  # not imported: no test started a Child
    for child in list(helpers.Child.running) if helpers is not None else []:
        child.kill()


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: a tiny model trains several times faster so than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    """A factory for a tiny random LlamaForCausalLM (hidden 64, 2 layers); every Linear dim is a multiple of 16."""
    def make(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, seed=0):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    return make


@pytest.fixture
def tiny(tmp_path, tiny_llama):
    """(pruned model dir, its masks, a learnable corpus): what a CPU fine-tune test runs on."""
    from finetune_helpers import learnable_corpus, pruned_tiny_model

    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)
    return model_dir, masks, learnable_corpus(tmp_path / "corpus.txt")
