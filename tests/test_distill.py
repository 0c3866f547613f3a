"""Distillation (sparse_adamw.pipeline.distill, SparseTrainer's teacher=): the chunked loss against a direct
computation with torch's own cross_entropy and kl_div, alpha = 0 as the plain run bit for bit, a frozen teacher,
pruned blocks kept at zero, an exact resume, and the errors for a wrong teacher or weight."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune_helpers import ArithmeticTokens as _Tokens, SigintAt, pruned_blocks_are_zero, trainer_args
from sparse_adamw.pipeline.distill import ChunkedDistillLoss, DistillConfig, distill_loss, shifted_labels
from sparse_adamw.pipeline.prune import prune_magnitude
from sparse_adamw.pipeline.trainer import SparseTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(logits, teacher_logits, labels, alpha, temperature, denominator):
    """(1 - a) CE + a T^2 KL(teacher || student), summed over the target tokens of the shifted labels, / denominator:
    written with torch's own functions on the whole [B, T-1, V] logits, in float64."""
    z = logits[:, :-1].double().reshape(-1, logits.shape[-1])
    t = teacher_logits[:, :-1].double().reshape(-1, logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    ce = F.cross_entropy(z[keep], y[keep], reduction="sum")
    kl = F.kl_div(F.log_softmax(z[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                  reduction="sum", log_target=True)
    return ((1 - alpha) * ce + alpha * temperature ** 2 * kl) / denominator


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 2.5)])
def test_chunked_loss_and_gradient_equal_a_direct_computation(chunk, alpha, temperature):
    g = torch.Generator().manual_seed(chunk * 31 + int(alpha * 10))
    batch, seq, vocab = 3, 11, 37
    logits = (3 * torch.randn(batch, seq, vocab, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[1, 4:7] = -100  # tokens without a target carry no term
    denominator = torch.tensor(29.0)

    targets = shifted_labels(labels).reshape(-1)
    loss = ChunkedDistillLoss.apply(logits.reshape(-1, vocab), teacher.reshape(-1, vocab), targets, alpha,
                                    temperature, denominator, chunk)
    (grad,) = torch.autograd.grad(2.0 * loss, logits)  # an upstream gradient other than 1 is applied too

    z = logits.detach().double().requires_grad_()
    expected = _reference(z, teacher, labels, alpha, temperature, 29.0)
    (expected_grad,) = torch.autograd.grad(2.0 * expected, z)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1])), "the last position has no target"


def test_bf16_logits_keep_one_chunk_in_fp32_and_match_within_bf16():
    g = torch.Generator().manual_seed(5)
    logits = (2 * torch.randn(2, 9, 50, generator=g)).bfloat16().requires_grad_()
    teacher = (2 * torch.randn(2, 9, 50, generator=g)).bfloat16()
    labels = torch.randint(0, 50, (2, 9), generator=g)
    loss = ChunkedDistillLoss.apply(logits.reshape(-1, 50), teacher.reshape(-1, 50), shifted_labels(labels).reshape(-1),
                                    0.5, 1.0, torch.tensor(16.0), 4)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16
    z = logits.detach().double().requires_grad_()
    expected = _reference(z, teacher, labels, 0.5, 1.0, 16.0)
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-4)  # bf16 storage: 8 bits


def test_micro_batches_normalized_by_the_whole_batch_add_up_to_the_whole_batch(tiny_llama):
    """With num_items_in_batch (the Trainer's count over the accumulated batch), two halves' gradients sum to the
    whole batch's: gradient accumulation gives the loss of the effective batch."""
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = _Tokens(n=4, seq=16).ids
    config = DistillConfig(alpha=0.4, temperature=2.0, chunk_tokens=5)

    def grads(batches, items):
        student.zero_grad()
        for b in batches:
            distill_loss(student, teacher, {"input_ids": b, "labels": b}, config, items).backward()
        return [p.grad.clone() for p in student.parameters()]

    whole = grads([ids], None)
    halves = grads([ids[:2], ids[2:]], torch.tensor(4 * 15))
    for a, b in zip(halves, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_on_models_the_loss_is_the_models_own_lm_loss_plus_the_reference_kl(tiny_llama):
    """distill_loss on real models: at alpha 0 it is the model's own LM loss (transformers shifts the labels
    itself), and at alpha > 0 the reference computed from the two models' logits."""
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = _Tokens(n=3, seq=16).ids
    inputs = {"input_ids": ids, "labels": ids}
    own = student(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(distill_loss(student, teacher, inputs, DistillConfig(alpha=0.0)), own,
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        z, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    expected = _reference(z, t, ids, 0.4, 2.0, 3 * 15)
    got = distill_loss(student, teacher, inputs, DistillConfig(alpha=0.4, temperature=2.0, chunk_tokens=7))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_squarehead_term_is_the_mean_normalized_mse_of_the_layers(tiny_llama):
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = _Tokens(n=2, seq=16).ids
    inputs = {"input_ids": ids, "labels": ids}
    plain = distill_loss(student, teacher, inputs, DistillConfig(alpha=0.5))
    with_hidden = distill_loss(student, teacher, inputs, DistillConfig(alpha=0.5, hidden_weight=0.7))
    hs = student(input_ids=ids, output_hidden_states=True).hidden_states
    ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    layers = [((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(hs[1:], ht[1:])]
    assert len(layers) == student.config.num_hidden_layers
    torch.testing.assert_close(with_hidden - plain, 0.7 * torch.stack(layers).mean(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- in SparseTrainer
def _args(output_dir, **overrides):
    return trainer_args(output_dir, **{"max_steps": 6, **overrides})


def _student(tiny_llama):
    model = tiny_llama(seed=0)
    masks = prune_magnitude(model, 0.25, progress=False)
    return model, masks


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_alpha_zero_is_the_plain_run_bit_for_bit(tiny_llama, tmp_path):
    plain = SparseTrainer(model=_student(tiny_llama)[0], args=_args(tmp_path / "a"), train_dataset=_Tokens())
    plain.train()
    zero = SparseTrainer(model=_student(tiny_llama)[0], args=_args(tmp_path / "b"), train_dataset=_Tokens(),
                         teacher=tiny_llama(seed=1), distill=DistillConfig(alpha=0.0))
    zero.train()
    expected = _weights(plain.model)
    for name, p in zero.model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_distilled_training_keeps_the_teacher_frozen_and_the_pruned_blocks_zero(tiny_llama, tmp_path):
    model, masks = _student(tiny_llama)
    teacher = tiny_llama(seed=1).train()
    frozen = _weights(teacher)
    plain = SparseTrainer(model=_student(tiny_llama)[0], args=_args(tmp_path / "a"), train_dataset=_Tokens())
    plain.train()
    trainer = SparseTrainer(model=model, args=_args(tmp_path / "b"), train_dataset=_Tokens(), teacher=teacher,
                            distill=DistillConfig(alpha=0.5, hidden_weight=0.1, chunk_tokens=20))
    trainer.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, frozen[name]), f"the teacher's {name} changed"
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(params[name], mask), name
    # The teacher changed the trajectory (it is not ignored).
    plain_weights = _weights(plain.model)
    assert any(not torch.equal(p, plain_weights[n]) for n, p in model.named_parameters())


def test_a_resumed_distilled_run_ends_bitwise_where_an_uninterrupted_one_does(tiny_llama, tmp_path):
    config = DistillConfig(alpha=0.6, temperature=2.0, chunk_tokens=24)

    def trainer(out, **kw):
        return SparseTrainer(model=_student(tiny_llama)[0], args=_args(out), train_dataset=_Tokens(),
                             teacher=tiny_llama(seed=1), distill=config, **kw)

    reference = trainer(tmp_path / "a")
    reference.train()
    interrupted = trainer(tmp_path / "b", callbacks=[SigintAt(3)])
    interrupted.train()
    assert interrupted.interrupted
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    expected = _weights(reference.model)
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), f"{name} differs from the uninterrupted run"


@pytest.mark.parametrize("bad,message", [
    (dict(vocab_size=320), "vocabulary of 320 tokens"),
    (dict(num_hidden_layers=3), "num_hidden_layers differ"),
])
def test_a_teacher_of_another_vocabulary_or_shape_is_refused(tiny_llama, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        SparseTrainer(model=_student(tiny_llama)[0], args=_args(tmp_path), train_dataset=_Tokens(),
                      teacher=tiny_llama(**bad), distill=DistillConfig(hidden_weight=1.0))


def test_a_teacher_of_another_architecture_is_refused(tiny_llama, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    other = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="'mistral' model"):
        SparseTrainer(model=_student(tiny_llama)[0], args=_args(tmp_path), train_dataset=_Tokens(), teacher=other)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=-0.1), "alpha must be in"), (dict(alpha=1.5), "alpha must be in"),
    (dict(alpha=math.nan), "alpha must be in"), (dict(temperature=0.0), "temperature must be positive"),
    (dict(hidden_weight=-1.0), "hidden-state"), (dict(chunk_tokens=0), "chunk_tokens"),
])
def test_bad_distillation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)


# ------------------------------------------------------------------------------------------- the command line
@pytest.fixture
def pruned_with_parent(tmp_path, tiny_llama):
    """(pruned model dir whose prune_report.json names its dense parent, the parent's dir, a corpus)."""
    from finetune_helpers import learnable_corpus, pruned_tiny_model
    from pipeline_helpers import save_tiny_model, tiny_tokenizer

    parent = save_tiny_model(tmp_path / "dense", tiny_llama(seed=0), tiny_tokenizer())
    model_dir, _ = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)  # seed 0: the parent, pruned
    (model_dir / "prune_report.json").write_text(json.dumps({"model": "elsewhere", "source": str(parent)}))
    return model_dir, parent, learnable_corpus(tmp_path / "corpus.txt")


def _run(model_dir, corpus, out, *extra):
    from finetune_helpers import tiny_run_args
    from sparse_adamw.pipeline.finetune import main

    return main(tiny_run_args(model_dir, corpus, out, "--max_steps", 6, "--max_eval_windows", 4, *extra))


def test_the_fine_tune_distils_from_the_parent_its_prune_report_names(pruned_with_parent, tmp_path, capsys):
    model_dir, parent, corpus = pruned_with_parent
    assert _run(model_dir, corpus, tmp_path / "out", "--distill_alpha", "0.7") == 0
    text = capsys.readouterr().out
    assert f"Distillation: 0.7 x KL(teacher || student) at T=1 + 0.3 x LM loss; teacher {parent}" in text
    report = json.loads((tmp_path / "out" / "finetune_report.json").read_text())
    ppl = report["perplexity"]
    # The dense parent's perplexity is measured and the recovered fraction follows from the three.
    assert ppl["dense"] is not None
    expected = (math.log(ppl["before"]) - math.log(ppl["after"])) / (math.log(ppl["before"]) - math.log(ppl["dense"]))
    assert report["recovered_fraction"] == pytest.approx(expected)
    recipe = report["recipe"]["distillation"]
    assert recipe["alpha"] == 0.7 and recipe["teacher"] == str(parent)
    assert "dense (teacher)" in text and f"Recovered {expected:.1%}" in text
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())["config"]
    assert config["distill"]["alpha"] == 0.7
    # The rerun of the complete run says so, with the dense perplexity and the share recovered.
    assert _run(model_dir, corpus, tmp_path / "out", "--distill_alpha", "0.7") == 0
    rerun = capsys.readouterr().out
    assert "This run is already complete" in rerun and f"(dense {ppl['dense']:.4f}, {expected:.1%} of" in rerun

    # --no_distill trains on the LM loss alone; as another configuration it needs its own folder.
    assert _run(model_dir, corpus, tmp_path / "plain", "--no_distill") == 0
    text = capsys.readouterr().out
    assert "Distillation:" not in text and "dense (teacher)" not in text
    plain = json.loads((tmp_path / "plain" / "finetune_report.json").read_text())
    assert plain["perplexity"]["dense"] is None and plain["recipe"]["distillation"] is None
    with pytest.raises(SystemExit) as exit_info:  # the distilled run's folder refuses it, naming the difference
        _run(model_dir, corpus, tmp_path / "out", "--no_distill")
    assert exit_info.value.code == 2 and "distill: {" in capsys.readouterr().err


@pytest.mark.parametrize("flags,expected", [
    (["--teacher", "{tmp}/missing"], "--teacher {tmp}/missing does not exist"),
    (["--distill_alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
    (["--distill_temperature", "0"], "temperature must be positive"),
    (["--no_distill", "--distill"], "--no_distill contradicts --distill"),
])
def test_bad_distillation_flags_fail_before_anything_loads(pruned_with_parent, tmp_path, capsys, flags, expected):
    model_dir, _, corpus = pruned_with_parent
    with pytest.raises(SystemExit) as exit_info:
        _run(model_dir, corpus, tmp_path / "out", *[f.format(tmp=tmp_path) for f in flags])
    assert exit_info.value.code == 2
    assert expected.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_distill_without_a_teacher_at_hand_is_an_error(tmp_path, tiny_llama, capsys):
    from finetune_helpers import learnable_corpus, pruned_tiny_model

    model_dir, _ = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama)  # no prune_report.json
    corpus = learnable_corpus(tmp_path / "corpus.txt")
    assert _run(model_dir, corpus, tmp_path / "quiet") == 0  # by default: no teacher, no distillation
    assert "Distillation:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _run(model_dir, corpus, tmp_path / "out", "--distill")
    assert "--distill needs the dense model" in capsys.readouterr().err


def test_a_teacher_of_another_vocabulary_stops_the_command_before_training(pruned_with_parent, tmp_path, tiny_llama,
                                                                          capsys):
    from pipeline_helpers import save_tiny_model, tiny_tokenizer

    model_dir, _, corpus = pruned_with_parent
    other = tmp_path / "other"
    save_tiny_model(other, tiny_llama(vocab_size=320), tiny_tokenizer())
    assert _run(model_dir, corpus, tmp_path / "out", "--teacher", other) == 2
    captured = capsys.readouterr()
    assert "vocabulary of 320 tokens" in captured.err and "Step " not in captured.out


# ------------------------------------------------------------------------------------------------------ FSDP2
def _fsdp_worker(rank, world, port, out_dir):
    """Rank `rank` of 2 (gloo): student and teacher sharded with FSDP2 as SparseTrainer shards them; the distillation
    loss and the student's gradients, gathered."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sparse_adamw.pipeline.distill import shard_teacher
    from sparse_adamw.sparsity import decoder_layers

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    student, teacher, ids = _fsdp_models()
    for layer in decoder_layers(student):
        fully_shard(layer)
    fully_shard(student)
    shard_teacher(teacher)
    assert all(p.to_local().numel() < p.numel() for p in teacher.parameters() if p.numel() > 1)  # sharded
    loss = distill_loss(student, teacher, {"input_ids": ids, "labels": ids},
                        DistillConfig(alpha=0.6, hidden_weight=0.2))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, "fsdp.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _fsdp_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    student = LlamaForCausalLM(config)
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    return student, teacher, _Tokens(n=2, seq=16).ids


def test_under_fsdp2_the_sharded_teacher_gives_the_one_process_loss_and_gradients(tmp_path):
    import socket

    from tests.utils import spawn_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    result = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    student, teacher, ids = _fsdp_models()
    loss = distill_loss(student, teacher, {"input_ids": ids, "labels": ids},
                        DistillConfig(alpha=0.6, hidden_weight=0.2))
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
