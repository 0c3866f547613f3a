"""The fine-tune with --generated_fraction on the CPU, with a tiny pruned model and a tiny dense teacher: the
training set the Trainer gets holds the teacher's share in place of as many corpus blocks, each started from the
block it replaces; the same seed writes the same text; a resume and --overwrite_output_dir read it back instead of
writing again; a rerun with other settings is refused; pruned blocks stay exactly zero; bad settings stop before
anything loads. The report and the results table carry the out-of-domain perplexity."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from finetune_helpers import learnable_corpus, pruned_blocks_are_zero, pruned_tiny_model, tiny_run_args
from pipeline_helpers import save_tiny_model, tiny_tokenizer
from sparse_adamw.pipeline import finetune, teacher_text
from sparse_adamw.pipeline.banner import generated_note
from sparse_adamw.pipeline.data import train_blocks
from sparse_adamw.pipeline.finetune import main
from sparse_adamw.pipeline.finetune_config import (DEFAULT_GENERATED_FRACTION, DEFAULT_GENERATED_MODE, _split,
                                                   build_parser, parse_arguments, resolve_arguments)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path, tiny_llama):
    """(pruned model dir, its masks, the dense teacher's dir, a learnable corpus)."""
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)
    teacher = save_tiny_model(tmp_path / "dense", tiny_llama(seed=1), tiny_tokenizer())
    return model_dir, masks, teacher, learnable_corpus(tmp_path / "corpus.txt")


def _args(setup, out, *extra):
    model_dir, _, teacher, corpus = setup
    return tiny_run_args(model_dir, corpus, out, "--teacher", teacher, "--max_steps", 3, "--max_eval_windows", 4,
                         "--ood_windows", 4, "--generated_prompt_tokens", 5, *extra)


@pytest.fixture
def datasets(monkeypatch):
    """The token blocks each run handed to the Trainer."""
    seen = []

    class Spy(finetune.TokenBlocks):
        def __init__(self, blocks):
            seen.append(blocks.clone())
            super().__init__(blocks)

    monkeypatch.setattr(finetune, "TokenBlocks", Spy)
    return seen


def test_the_teachers_share_replaces_as_many_corpus_blocks(setup, tmp_path, datasets, capsys):
    model_dir, masks, _, corpus = setup
    out = tmp_path / "a"
    assert main(_args(setup, out, "--generated_fraction", 0.3, "--generated_mode", "replace")) == 0
    text = capsys.readouterr().out
    corpus_blocks = train_blocks(tiny_tokenizer(), dataset_path=str(corpus), block_size=32)
    trained = datasets[0]
    assert trained.shape == corpus_blocks.shape
    changed = (trained != corpus_blocks).any(dim=1).nonzero().flatten()
    assert len(changed) == round(0.3 * len(corpus_blocks))
    kept = load_file(str(out / teacher_text.TEXT_FILE))["input_ids"].long()
    assert torch.equal(trained[changed], kept)
    # each written sequence starts with the first 5 tokens of the block it replaced, and goes on otherwise
    assert torch.equal(kept[:, :5], corpus_blocks[changed, :5])
    assert (kept[:, 5:] != corpus_blocks[changed, 5:]).any(dim=1).all()
    assert (f"Teacher's text: writing {len(changed)} sequences in place of as many of the {len(corpus_blocks)} "
            "corpus blocks") in text

    report = json.loads((out / "finetune_report.json").read_text())
    assert report["teacher_text"]["sequences"] == len(changed) and report["teacher_text"]["reused"] is False
    assert report["configuration"]["generated"] == {"fraction": 0.3, "temperature": 1.0, "top_k": 0,
                                                    "prompt_tokens": 5, "mode": "replace"}
    ood = report["out_of_domain"]
    assert set(ood["perplexity"]) == {"before", "after", "dense"} and all(ood["perplexity"].values())
    assert set(ood["by_kind"]["after"]) == {"all", "novels", "plays", "speeches", "recipes"}
    assert re.search(r"^Perplexity, out of domain\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.M), text

    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(params[name], mask), name

    # the same command elsewhere writes the same text; another seed, other text
    assert main(_args(setup, tmp_path / "b", "--generated_fraction", 0.3, "--generated_mode", "replace")) == 0
    assert torch.equal(load_file(str(tmp_path / "b" / teacher_text.TEXT_FILE))["input_ids"].long(), kept)
    replace = ("--generated_fraction", 0.3, "--generated_mode", "replace")
    assert main(_args(setup, tmp_path / "c", *replace, "--seed", 5)) == 0
    assert not torch.equal(load_file(str(tmp_path / "c" / teacher_text.TEXT_FILE))["input_ids"].long(), kept)


def test_the_teachers_share_added_joins_the_whole_corpus_in_the_corpus_steps(setup, tmp_path, datasets, capsys):
    """--generated_mode add: the Trainer gets every corpus block, then the teacher's sequences, a third of the mix
    here; a schedule in epochs takes the steps the corpus alone would (fewer passes over the larger mix)."""
    model_dir, masks, _, corpus = setup
    corpus_blocks = train_blocks(tiny_tokenizer(), dataset_path=str(corpus), block_size=32)
    epochs = ["--max_steps", -1, "--num_train_epochs", 2, "--gradient_accumulation_steps", 2]
    assert main(_args(setup, tmp_path / "corpus", *epochs)) == 0
    corpus_steps = json.loads((tmp_path / "corpus" / "finetune_report.json").read_text())["steps"]
    out = tmp_path / "add"
    assert main(_args(setup, out, *epochs, "--generated_fraction", 1 / 3, "--generated_mode", "add")) == 0
    text = capsys.readouterr().out
    trained, added = datasets[1], round(len(corpus_blocks) / 2)
    assert trained.shape == (len(corpus_blocks) + added, 32)
    assert torch.equal(trained[:len(corpus_blocks)], corpus_blocks)
    kept = load_file(str(out / teacher_text.TEXT_FILE))["input_ids"].long()
    assert torch.equal(trained[len(corpus_blocks):], kept)
    starts = {tuple(row) for row in corpus_blocks[:, :5].tolist()}
    assert all(tuple(row) in starts for row in kept[:, :5].tolist())  # each from the first tokens of a block
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["steps"] == corpus_steps > 0
    assert report["teacher_text"]["sequences"] == added and report["configuration"]["generated"]["mode"] == "add"
    assert f"writing {added} sequences added to the {len(corpus_blocks)} corpus blocks" in text
    assert "the schedule keeps the corpus's steps" in text

    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(params[name], mask), name


def test_a_resume_and_a_fresh_start_read_the_text_back(setup, tmp_path, datasets, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--generated_fraction", 0.5, "--keep_checkpoints")) == 0
    path = out / teacher_text.TEXT_FILE
    written, stamp = path.read_bytes(), path.stat().st_mtime_ns
    losses = re.findall(r"^Step \d+: loss=\S+", capsys.readouterr().out, re.M)

    def no_second_generation(*args, **kwargs):
        raise AssertionError("the teacher wrote its text a second time")

    monkeypatch.setattr(teacher_text, "generate_shared", no_second_generation)
    more = _args(setup, out, "--generated_fraction", 0.5, "--keep_checkpoints")
    more[more.index("--max_steps") + 1] = "5"
    assert main(more) == 0  # trains on from checkpoint-3
    text = capsys.readouterr().out
    assert "Resuming from" in text and "read back from" in text
    assert torch.equal(datasets[1], datasets[0])
    assert main(_args(setup, out, "--generated_fraction", 0.5, "--overwrite_output_dir")) == 0
    assert torch.equal(datasets[2], datasets[0])
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stamp
    assert json.loads((out / "finetune_report.json").read_text())["teacher_text"]["reused"] is True
    # the run that wrote the text and the one that read it back trained alike: writing left no trace in the
    # process's random state
    assert losses and re.findall(r"^Step \d+: loss=\S+", capsys.readouterr().out, re.M) == losses


@pytest.mark.parametrize("change, line", [
    (("--generated_temperature", 0.7), '  generated: {"fraction": 0.5, "temperature": 1.0, "top_k": 0, '
                                       '"prompt_tokens": 5, "mode": "add"} -> {"fraction": 0.5, '
                                       '"temperature": 0.7'),
    (("--generated_fraction", 0), '  generated: {"fraction": 0.5, "temperature": 1.0, "top_k": 0, "prompt_tokens": 5, '
                                  '"mode": "add"} -> (none)'),
    (("--generated_mode", "replace"), '"mode": "add"} -> {"fraction": 0.5, "temperature": 1.0, "top_k": 0, '
                                      '"prompt_tokens": 5, "mode": "replace"}'),
])
def test_a_rerun_with_other_settings_is_refused(setup, tmp_path, capsys, change, line):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--generated_fraction", 0.5, "--skip_eval")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(_args(setup, out, "--generated_fraction", 0.5, "--skip_eval", *change))  # the last wins
    assert exit_info.value.code == 2
    assert line in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--generated_fraction", 1.5), "--generated_fraction must be in [0, 1], got 1.5"),
    (("--generated_fraction", -0.2), "--generated_fraction must be in [0, 1], got -0.2"),
    (("--generated_fraction", 0.5, "--generated_temperature", 0), "--generated_temperature must be positive"),
    (("--generated_fraction", 0.5, "--generated_temperature", -2), "--generated_temperature must be positive"),
    (("--generated_fraction", 0.5, "--generated_top_k", -1), "--generated_top_k must be >= 0"),
    (("--generated_fraction", 0.5, "--generated_prompt_tokens", 32), "leaves nothing to generate"),
    (("--generated_fraction", 0.5, "--no_distill"), "needs the dense teacher to write the text, and --no_distill"),
    (("--generated_fraction", 1, "--generated_mode", "add"), "its --generated_fraction must be below 1"),
])
def test_bad_settings_stop_before_anything_loads(setup, tmp_path, capsys, monkeypatch, extra, message):
    model_dir, _, teacher, corpus = setup
    args = tiny_run_args(model_dir, corpus, tmp_path / "out", *extra)
    if "--no_distill" not in extra:
        args += ["--teacher", str(teacher)]
    monkeypatch.setattr("sparse_adamw.pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("cuda, extra, expected", [
    (True, (), DEFAULT_GENERATED_FRACTION),  # GPUs, distilling: the measured default
    (False, (), 0.0),  # the CPU: too slow to write (RESULTS.md)
    (True, ("--no_distill",), 0.0),  # no teacher, no text
    (True, ("--generated_fraction", 0), 0.0),
    (False, ("--generated_fraction", 0.3), 0.3),
])
def test_the_default_share_is_written_on_gpus_where_distillation_is_on(setup, cuda, extra, expected):
    model_dir, _, teacher, _ = setup
    argv = ["--model", str(model_dir), *map(str, extra)]
    if "--no_distill" not in extra:
        argv += ["--teacher", str(teacher)]
    args, training = _split(build_parser().parse_args(argv))
    plan = resolve_arguments(args, training, cuda_available=cuda, bf16_supported=cuda, world_size=1)
    assert plan.args.generated_fraction == expected and plan.args.generated_mode == DEFAULT_GENERATED_MODE
    assert DEFAULT_GENERATED_FRACTION > 0


@pytest.mark.parametrize("cuda, extra, note", [
    (True, (), f"{DEFAULT_GENERATED_FRACTION:g} of the training sequences written by the teacher before training, "
               "added to the corpus (T=1, top-k off, from the first 16 tokens of corpus blocks), kept in "),
    (True, ("--generated_mode", "replace", "--generated_top_k", 50, "--generated_fraction", 0.3),
     "0.3 of the training sequences written by the teacher before training, in place of as many corpus blocks "
     "(T=1, top-k 50, from the first 16 tokens of corpus blocks), kept in "),
    (False, (), "off"),
    (True, ("--no_distill",), "off (no teacher)"),
])
def test_the_banner_says_how_the_teachers_text_joins_the_corpus(setup, tmp_path, cuda, extra, note):
    model_dir, _, teacher, _ = setup
    argv = ["--model", str(model_dir), "--output_dir", str(tmp_path / "out"), *map(str, extra)]
    if "--no_distill" not in extra:
        argv += ["--teacher", str(teacher)]
    args, training = _split(build_parser().parse_args(argv))
    plan = resolve_arguments(args, training, cuda_available=cuda, bf16_supported=cuda, world_size=1)
    where = f"{tmp_path / 'out' / teacher_text.TEXT_FILE}"
    assert generated_note(plan) == (note + where if note.endswith("kept in ") else note)


def test_without_a_teacher_at_hand_the_error_says_how_to_give_one(setup, tmp_path, capsys):
    model_dir, _, _, corpus = setup  # no prune_report.json next to the model names its dense parent
    with pytest.raises(SystemExit):
        parse_arguments(tiny_run_args(model_dir, corpus, tmp_path / "out", "--generated_fraction", 0.5))
    assert "needs the dense teacher to write the text, and no prune_report.json next to" in capsys.readouterr().err


@pytest.mark.parametrize("mode", teacher_text.MODES)
def test_two_processes_write_a_share_each_and_one_process_reads_it_back(setup, tmp_path, datasets, capsys, mode):
    """Through torchrun (gloo): each rank writes every other sequence, all ranks train on the whole text; the same
    run resumed in one process reads the text back."""
    import subprocess
    import sys

    from finetune_helpers import subprocess_env

    out = tmp_path / "two"
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sparse_adamw.pipeline.finetune",
         *_args(setup, out, "--generated_fraction", 0.5, "--generated_mode", mode, "--keep_checkpoints",
                "--skip_eval", "--gradient_accumulation_steps", 4)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    report = json.loads((out / "finetune_report.json").read_text())["teacher_text"]
    n = report["sequences"]
    assert report["per_process"] == [-(-n // 2), n // 2]
    kept = load_file(str(out / teacher_text.TEXT_FILE))["input_ids"].long()
    corpus_blocks = train_blocks(tiny_tokenizer(), dataset_path=str(setup[3]), block_size=32)
    rows = teacher_text.prompt_rows(len(corpus_blocks), teacher_text.TextSettings(0.5, mode=mode), 42)
    assert torch.equal(kept[:, :5], corpus_blocks[rows, :5])  # every row written, each from its own block

    more = _args(setup, out, "--generated_fraction", 0.5, "--generated_mode", mode, "--keep_checkpoints",
                 "--skip_eval", "--gradient_accumulation_steps", 8)
    more[more.index("--max_steps") + 1] = "4"
    assert main(more) == 0
    assert "read back from" in capsys.readouterr().out
    assert torch.equal(datasets[0][rows] if mode == "replace" else datasets[0][len(corpus_blocks):], kept)
