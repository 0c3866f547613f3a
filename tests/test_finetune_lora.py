"""The fine-tune with --lora, end to end on a tiny pruned model (CPU): the merged model against W + M ⊙ (B·A)·scale
computed with numpy from the files (np.kron for M), pruned blocks bitwise zero after the merge and after a resume,
a resumed run bitwise equal to an uninterrupted one, the adapter loadable by PEFT, and the errors a user meets
before training."""
import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sparse_adamw.masks import MASKS_FILE, load_masks
from sparse_adamw.pipeline.finetune import main
from sparse_adamw.pipeline.lora import load_masked_adapter

from tests.utils import kron_mask
from finetune_helpers import (REPO, Finetune, learnable_corpus, pruned_tiny_model, run_finetune, subprocess_env,
                              tiny_run_args)

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "base_model.model."  # PEFT's key prefix, written out here rather than imported


@pytest.fixture
def tiny(tmp_path, tiny_llama):
    # odd block counts: 80 = 5 blocks of 16, 48 = 3
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, hidden_size=48, intermediate_size=80)
    return model_dir, masks, learnable_corpus(tmp_path / "corpus.txt")


def _elementwise(block_mask, shape):
    return kron_mask(block_mask, shape).astype(np.float32)


def _expected_merge(model_dir, out, masks):
    """{weight name: W + M ⊙ (B·A)·alpha/r} from the pruned model's and the adapter's files."""
    pruned = load_file(str(model_dir / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    expected = {}
    for name, mask in masks.items():
        module = name[: -len(".weight")]
        a, b = adapter[f"{PREFIX}{module}.lora_A.weight"], adapter[f"{PREFIX}{module}.lora_B.weight"]
        assert a.shape == (config["r"], pruned[name].shape[1]) and b.shape == (pruned[name].shape[0], config["r"])
        expected[name] = pruned[name].astype(np.float64) + _elementwise(mask, pruned[name].shape) * (
            b.astype(np.float64) @ a.astype(np.float64)) * scale
    return pruned, expected


def test_the_merged_model_is_w_plus_the_masked_product_and_keeps_every_pruned_block_zero(tiny, tmp_path):
    model_dir, masks, corpus = tiny
    out = tmp_path / "lora"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 4, "--save_steps", 2, "--lora", "--lora_r", 4,
                              "--lora_alpha", 12, "--max_eval_windows", 4, "--ood_windows", 0)) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 12.0)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    pruned, expected = _expected_merge(model_dir, out, masks)
    merged = load_file(str(out / "model.safetensors"))
    for name, mask in masks.items():
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        dead = _elementwise(mask, merged[name].shape) == 0
        assert dead.any() and (merged[name][dead] == 0).all(), f"{name}: a pruned entry is nonzero"
        assert not np.array_equal(merged[name], pruned[name]), f"{name}: the adapter did not train"
    for name in pruned.keys() - masks.keys():  # embeddings, norms, lm_head: frozen, unchanged
        assert np.array_equal(merged[name], pruned[name]), name
    # The adapter's masks are the prune step's.
    adapter_masks, block = load_masks(out / "adapter" / MASKS_FILE)
    assert block == (16, 16) and adapter_masks.keys() == masks.keys()
    assert all(torch.equal(adapter_masks[n], masks[n]) for n in masks)
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["lora"]["r"] == 4 and report["configuration"]["lora"]["alpha"] == 12.0
    assert report["pruned_block_fraction"]["before"] == report["pruned_block_fraction"]["after"] > 0.2
    assert report["sparsity"]["after"] >= report["pruned_block_fraction"]["after"]

    # A plain from_pretrained on the output folder is the merged model (the adapter's folder does not redirect it),
    # and it computes what the pruned model with the adapter computes.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out))
    adapted = AutoModelForCausalLM.from_pretrained(str(model_dir))
    load_masked_adapter(adapted, out / "adapter")
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_checkpoints_hold_the_adapters_only_and_a_resumed_run_ends_bitwise_as_an_uninterrupted_one(tiny, tmp_path):
    """Ctrl+C after step 2 (a checkpoint at the end of that step), then the same command: the same merged weights,
    bit for bit, as a run never interrupted (dropout on: the RNG state travels in the checkpoint)."""
    model_dir, masks, corpus = tiny

    def args(out):
        return tiny_run_args(model_dir, corpus, out, "--max_steps", 6, "--save_steps", 2, "--logging_steps", 1,
                             "--lora", "--lora_r", 4, "--lora_dropout", 0.1, "--skip_eval")

    whole = Finetune(args(tmp_path / "whole"))
    out = tmp_path / "interrupted"
    run = Finetune(args(out))
    run.wait_for("Step 2:")
    run.send(signal.SIGINT)
    assert run.finish() == 130, run.stdout + run.stderr
    stopped = int(re.search(r"^Interrupted at step (\d+): checkpoint saved", run.stdout, re.M).group(1))
    checkpoint = out / f"checkpoint-{stopped}"
    held = load_file(str(checkpoint / "model.safetensors"))
    assert held and all(".lora_A" in k or ".lora_B" in k for k in held), sorted(held)[:4]  # no frozen weight
    done = run_finetune(args(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Resuming from {checkpoint}" in done.stdout and "Traceback" not in done.stderr
    assert whole.finish() == 0, whole.stdout + whole.stderr
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for name, mask in masks.items():
        dead = _elementwise(mask, b[name].shape) == 0
        assert (b[name][dead] == 0).all(), name
    # A rerun of the complete run says so; one with another rank is refused, naming the difference.
    again = run_finetune(args(out))
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr
    other = run_finetune(args(out)[:-5] + ["--lora_r", "8", "--lora_dropout", "0.1", "--skip_eval"])
    assert other.returncode == 2 and '"r": 4' in other.stderr and '"r": 8' in other.stderr, other.stderr


def test_distilled_with_one_copy_of_the_weights_ends_bitwise_as_with_two(tiny, tmp_path, tiny_llama):
    """The default shares the dense teacher's weights with the student (masked in each product); with
    --lora_separate_teacher the teacher is a copy of its own. The merged models are bitwise equal."""
    from pipeline_helpers import save_tiny_model, tiny_tokenizer

    model_dir, masks, corpus = tiny
    # the dense parent: the same random model before pruning (pruned_tiny_model prunes tiny_llama(**sizes))
    teacher = save_tiny_model(tmp_path / "dense", tiny_llama(hidden_size=48, intermediate_size=80), tiny_tokenizer())
    outputs = {}
    for name, extra in (("shared", []), ("separate", ["--lora_separate_teacher"])):
        done = run_finetune(tiny_run_args(model_dir, corpus, tmp_path / name, "--max_steps", 4, "--lora", "--lora_r",
                                          4, "--teacher", teacher, "--max_eval_windows", 4, "--ood_windows", 0,
                                          *extra))
        assert done.returncode == 0, done.stdout + done.stderr
        outputs[name] = done.stdout
        assert "Distillation: 0.5 x KL" in done.stdout
    assert "share one copy of the dense weights" in outputs["shared"]
    assert "the teacher is a second copy of the weights (--lora_separate_teacher)" in outputs["separate"]
    a = load_file(str(tmp_path / "shared" / "model.safetensors"))
    b = load_file(str(tmp_path / "separate" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    pruned, expected = _expected_merge(model_dir, tmp_path / "shared", masks)
    for name, mask in masks.items():
        np.testing.assert_allclose(a[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert (a[name][_elementwise(mask, a[name].shape) == 0] == 0).all(), name


def test_the_teachers_text_with_one_copy_of_the_weights(tiny, tmp_path, tiny_llama):
    """--generated_fraction under --lora, the student and the teacher sharing one copy of the dense weights: the
    teacher writes its share with its own dense forward, and the merge keeps every pruned block zero."""
    from pipeline_helpers import save_tiny_model, tiny_tokenizer
    from safetensors.torch import load_file as load_tensors

    from sparse_adamw.pipeline.data import train_blocks
    from sparse_adamw.pipeline.teacher_text import TEXT_FILE

    model_dir, masks, corpus = tiny
    teacher = save_tiny_model(tmp_path / "dense", tiny_llama(hidden_size=48, intermediate_size=80), tiny_tokenizer())
    out = tmp_path / "lora"
    done = run_finetune(tiny_run_args(model_dir, corpus, out, "--max_steps", 3, "--lora", "--lora_r", 4, "--teacher",
                                      teacher, "--generated_fraction", 0.25, "--generated_prompt_tokens", 5,
                                      "--max_eval_windows", 4, "--ood_windows", 0))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "share one copy of the dense weights" in done.stdout
    blocks = train_blocks(tiny_tokenizer(), dataset_path=str(corpus), block_size=32)
    written = load_tensors(str(out / TEXT_FILE))["input_ids"]
    assert written.shape == (round(len(blocks) * 0.25 / 0.75), 32)  # added to the corpus, a quarter of the mix
    merged = load_file(str(out / "model.safetensors"))
    for name, mask in masks.items():
        assert (merged[name][_elementwise(mask, merged[name].shape) == 0] == 0).all(), name


def test_peft_loads_the_adapter_as_written(tiny, tmp_path):
    """PEFT reads the adapter's config and weights as they are (its layers then add B·A unmasked: the docs say
    so, and load_masked_adapter applies the masks)."""
    import peft  # a test requirement (setup.py), installed by .ci/run
    from transformers import AutoModelForCausalLM

    model_dir, _, corpus = tiny
    out = tmp_path / "lora"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--lora", "--lora_r", 2, "--skip_eval",
                              "--lora_target_modules", "q_proj,down_proj")) == 0
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out / "adapter"))
    written = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == written.keys() and len(written) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert all(np.array_equal(loaded[k].numpy(), written[k]) for k in written)


def test_an_adapter_saved_for_other_masks_is_refused(tiny, tmp_path, tiny_llama):
    model_dir, _, corpus = tiny
    out = tmp_path / "lora"
    assert main(tiny_run_args(model_dir, corpus, out, "--max_steps", 2, "--lora", "--lora_r", 2, "--skip_eval")) == 0
    from transformers import AutoModelForCausalLM

    other_dir, _ = pruned_tiny_model(tmp_path / "other", tiny_llama, hidden_size=48, intermediate_size=80, seed=3)
    with pytest.raises(ValueError, match="saved for other masks"):
        load_masked_adapter(AutoModelForCausalLM.from_pretrained(str(other_dir)), out / "adapter")
    (out / "adapter" / MASKS_FILE).unlink()
    with pytest.raises(ValueError, match="carries no block masks"):
        load_masked_adapter(AutoModelForCausalLM.from_pretrained(str(model_dir)), out / "adapter")


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "8"], "--lora_r only apply with --lora"),
    (["--lora", "--lora_r", "0"], "--lora_r must be at least 1"),
    (["--lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--lora", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--lora", "--fsdp"], "--lora does not run under --fsdp"),
])
def test_flags_a_lora_run_cannot_take_are_refused_before_anything_loads(tiny, tmp_path, capsys, flags, message):
    model_dir, _, corpus = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run_args(model_dir, corpus, tmp_path / "o", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_target_modules_that_name_nothing_are_an_error_before_training(tiny, tmp_path, capsys):
    model_dir, _, corpus = tiny
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "o", "--lora", "--lora_target_modules", "qproj",
                              "--skip_eval")) == 2
    err = capsys.readouterr().err
    assert "no Linear of the model is named by the LoRA target modules ['qproj']" in err and "Traceback" not in err


def test_a_masks_file_of_another_model_is_refused_before_training(tiny, tmp_path, tiny_llama, capsys):
    model_dir, _, corpus = tiny
    other, _ = pruned_tiny_model(tmp_path / "other", tiny_llama, num_hidden_layers=3, hidden_size=48,
                                 intermediate_size=80, seed=5)
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "o", "--lora", "--skip_eval", "--masks_file",
                              other / MASKS_FILE)) == 2
    err = capsys.readouterr().err
    assert "parameter(s) the model does not have, e.g. model.layers.2." in err and "Traceback" not in err
    # The same layers, other blocks: the model is nonzero where that file says pruned.
    same, _ = pruned_tiny_model(tmp_path / "same", tiny_llama, hidden_size=48, intermediate_size=80, seed=5)
    assert main(tiny_run_args(model_dir, corpus, tmp_path / "p", "--lora", "--skip_eval", "--masks_file",
                              same / MASKS_FILE)) == 2
    assert "has nonzeros in blocks that" in capsys.readouterr().err


def test_plain_lora_s_merge_fills_the_pruned_blocks_in(tiny, tmp_path):
    """The baseline benchmarks/plain_lora.py measures: PEFT's unmasked LoRA, merged, leaves no pruned block zero,
    and the merge changes nothing the model computes (so the fill-in is what plain LoRA trained)."""
    model_dir, _, corpus = tiny
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plain_lora.py"), "--model", str(model_dir),
                           "--dataset_path", str(corpus), "--block_size", "32", "--output_dir", str(tmp_path / "p"),
                           "--max_steps", "3", "--micro_batch", "4", "--max_eval_windows", "4",
                           "--learning_rate", "3e-3"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["pruned_blocks_still_zero"] == 0.0
    ppl = result["perplexity"]
    assert ppl["adapted"] != ppl["before"] and ppl["merged"] == pytest.approx(ppl["adapted"], rel=1e-4)


def test_lora_takes_ddp_and_refuses_the_sharded_step():
    from sparse_adamw.pipeline.finetune_config import _split, build_parser, resolve_arguments

    def resolve(*flags):
        args, training = _split(build_parser().parse_args(["--model", "m", "--lora", *flags]))
        return resolve_arguments(args, training, cuda_available=True, bf16_supported=True, world_size=2)

    with pytest.raises(ValueError, match="the sharded step has nothing to share"):
        resolve("--data_parallel", "sharded")
    plan = resolve()
    assert plan.args.data_parallel == "ddp" and plan.lora.r == 16 and plan.training["learning_rate"] == 2e-4
    assert plan.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The packaged model (the offline default, here on the CPU) takes its measured rate.
    args, training = _split(build_parser().parse_args(["--lora"]))
    plan = resolve_arguments(args, training, cuda_available=False, bf16_supported=False, world_size=1)
    assert plan.cpu_default and plan.training["learning_rate"] == 1e-3
