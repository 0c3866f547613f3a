"""SparseTrainer: optimizer groups and masks, sparsity kept and checked, Ctrl+C checkpoint and exact resume."""
import collections
import os
import signal
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune_helpers import ArithmeticTokens as _Tokens, LossLog, pruned_blocks_are_zero
from sparse_adamw import SparseAdamW
from sparse_adamw import masks as masks_module
from sparse_adamw.masks import block_mask_from_zeros, save_masks
from sparse_adamw.pipeline.prune import prune_magnitude
from sparse_adamw.pipeline.trainer import (
    SigintCheckpointCallback,
    SparseTrainer,
    SparsityViolation,
    StepLogCallback,
    linear_block_masks,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=8, learning_rate=3e-3, weight_decay=0.01, save_strategy="no", logging_steps=100,
                  report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def _pruned(tiny_llama, sparsity=0.25):
    model = tiny_llama()
    masks = prune_magnitude(model, sparsity, progress=False)
    return model, masks


def _params(model):
    return dict(model.named_parameters())


def test_optimizer_has_the_trainers_groups_and_the_models_masks(tiny_llama, tmp_path):
    model, masks = _pruned(tiny_llama)
    trainer = SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens())
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, SparseAdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decay["param_names"]
    assert "model.embed_tokens.weight" in decay["param_names"]
    assert "model.norm.weight" in no_decay["param_names"]
    assert all("norm" in n for n in no_decay["param_names"])
    params = _params(model)
    assert set(masks) == set(linear_block_masks(model))  # the masks are the pruned Linear weights, no more
    for name, p in params.items():
        state_mask = optimizer.state[p].get("block_mask") if p in optimizer.state else None
        if name in masks:
            assert torch.equal(state_mask, masks[name]), name
        else:
            assert state_mask is None, name


def test_training_keeps_pruned_blocks_exactly_zero_and_learns(tiny_llama, tmp_path):
    model, masks = _pruned(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = LossLog()
    trainer = SparseTrainer(model=model, args=_args(tmp_path, max_steps=30, logging_steps=5, learning_rate=1e-2),
                            train_dataset=_Tokens(), callbacks=[losses])
    trainer.train()
    assert losses.losses[-1] < 0.8 * losses.losses[0], losses.losses
    params = _params(model)
    optimizer = trainer.sparse_optimizer
    for name, mask in masks.items():
        p = params[name]
        assert pruned_blocks_are_zero(p, mask), f"{name}: a pruned block became nonzero"
        assert torch.equal(optimizer.state[p]["block_mask"], mask), f"{name}: the mask drifted"
        assert optimizer.state[p]["exp_avg"].shape == (int(mask.sum()), 16, 16), f"{name}: state is not compact"
        live = block_mask_from_zeros(before[name]) & mask
        changed = block_mask_from_zeros(p.detach() - before[name]) & live
        assert torch.equal(changed, live), f"{name}: some live blocks did not train"
    assert trainer.verify_sparsity() == len(masks)


def test_masks_file_is_used_and_checked_against_the_model(tiny_llama, tmp_path):
    model, masks = _pruned(tiny_llama)
    path = save_masks(tmp_path / "block_masks.pt", masks)
    trainer = SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(), masks_file=path)
    optimizer = trainer.create_optimizer()
    params = _params(model)
    for name, mask in masks.items():
        assert torch.equal(optimizer.state[params[name]]["block_mask"], mask)

    # The same file against an unpruned model: its pruned blocks hold nonzeros.
    with pytest.raises(SparsityViolation, match="marks pruned"):
        SparseTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_Tokens(), masks_file=path)
    # A mask for a parameter the model does not have.
    bad = dict(masks, **{"model.layers.9.mlp.up_proj.weight": next(iter(masks.values()))})
    with pytest.raises(ValueError, match="does not have"):
        SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(), masks=bad)
    # A mask of the wrong shape.
    name = next(iter(masks))
    with pytest.raises(ValueError, match="shape"):
        SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(), masks={name: masks[name][:1]})


@pytest.fixture
def zero_scans(monkeypatch):
    """Counts the passes over each tensor's zeros, keyed by data_ptr: every call of block_mask_from_zeros, in
    sparse_adamw.masks (leaked_blocks calls it there) and wherever a module of the package imported it."""
    original = masks_module.block_mask_from_zeros
    counts = collections.Counter()

    def counting(weight, *args, **kwargs):
        counts[weight.data_ptr()] += 1
        return original(weight, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "sparse_adamw" and getattr(module, "block_mask_from_zeros", None) is original:
            monkeypatch.setattr(module, "block_mask_from_zeros", counting)
    return counts


class _ScansAtFirstStep(TrainerCallback):
    """A copy of the scan counts when the first optimizer step begins."""

    def __init__(self, counts):
        self.counts, self.at_first_step = counts, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at_first_step is None:
            self.at_first_step = dict(self.counts)


def _scans_before_the_first_step(trainer, at_start, resume_from=None):
    """{Linear weight name: how many times its zeros were read from the trainer's construction to the first step}."""
    trainer.train(resume_from_checkpoint=resume_from)
    return {f"{name}.weight": at_start.at_first_step.get(module.weight.data_ptr(), 0)
            for name, module in trainer.model.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("source", ["derived", "masks_file"])
def test_a_fresh_start_reads_each_weight_once(tiny_llama, tmp_path, zero_scans, source):
    """The masks are derived (or the file checked) once, when the trainer is made; the optimizer takes them as they
    are and the start of training does not check them again."""
    model, masks = _pruned(tiny_llama)
    given = {"masks_file": save_masks(tmp_path / "block_masks.pt", masks)} if source == "masks_file" else {}
    zero_scans.clear()
    at_start = _ScansAtFirstStep(zero_scans)
    trainer = SparseTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_Tokens(),
                            callbacks=[at_start], **given)
    scans = _scans_before_the_first_step(trainer, at_start)
    assert set(masks) < set(scans)
    # Derived: every Linear weight once (lm_head has no zero block, so no mask); given: the masked ones once.
    assert scans == {name: 1 if name in masks or source == "derived" else 0 for name in scans}
    assert trainer.masks.keys() == masks.keys()
    assert all(torch.equal(trainer.masks[name], mask) for name, mask in masks.items())


def test_a_resumed_start_reads_each_weight_at_most_twice(tiny_llama, tmp_path, zero_scans):
    """Derived when the trainer is made, then checked once more against the checkpoint's weights and masks."""
    first = SparseTrainer(model=_pruned(tiny_llama)[0], train_dataset=_Tokens(),
                          args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    first.train()
    model, masks = _pruned(tiny_llama)
    zero_scans.clear()
    at_start = _ScansAtFirstStep(zero_scans)
    trainer = SparseTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_Tokens(),
                            callbacks=[at_start])
    scans = _scans_before_the_first_step(trainer, at_start, str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3
    assert scans == {name: 2 if name in masks else 1 for name in scans}


def test_a_nonzero_pruned_block_stops_a_save(tiny_llama, tmp_path):
    model, masks = _pruned(tiny_llama)
    trainer = SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens())
    trainer.create_optimizer()
    name, mask = next(iter(masks.items()))
    row, col = (~mask).nonzero()[0].tolist()
    with torch.no_grad():
        _params(model)[name][16 * row, 16 * col] = 1e-3
    with pytest.raises(SparsityViolation, match=name.replace(".", r"\.")):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


class _SigintAt(TrainerCallback):
    """Sends this process a real SIGINT at the end of optimizer step `step`, like a Ctrl+C."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class _StateAtStart(TrainerCallback):
    """A copy of the optimizer state when training (re)starts, after a checkpoint's state is loaded."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        names = {id(p): n for n, p in kwargs["model"].named_parameters()}
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.state = {names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for p, s in inner.state.items()}


def _state_by_name(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: s for p, s in trainer.sparse_optimizer.state.items()}


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_is_exact(tiny_llama, tmp_path, monkeypatch, impl):
    """With Triton (under the interpreter here), the steps after the first take step()'s fast path."""
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", impl)
    handler = signal.getsignal(signal.SIGINT)
    reference = SparseTrainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path / "a"), train_dataset=_Tokens())
    reference.train()

    interrupted = SparseTrainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path / "b"), train_dataset=_Tokens(),
                                callbacks=[_SigintAt(3)])
    interrupted.train()
    assert interrupted.interrupted and interrupted.state.global_step == 3
    assert signal.getsignal(signal.SIGINT) == handler, "the SIGINT handler was not restored"
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()

    at_start = _StateAtStart()
    resumed = SparseTrainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path / "b"), train_dataset=_Tokens(),
                            callbacks=[at_start])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    saved = _state_by_name(interrupted)
    assert set(at_start.state) == set(saved)
    for name, state in saved.items():
        assert set(at_start.state[name]) == set(state), name
        assert at_start.state[name]["step"] == state["step"] == 3, name
        for key in ("exp_avg", "exp_avg_sq", "block_mask"):
            if key in state:
                assert torch.equal(at_start.state[name][key], state[key]), f"{name}.{key} differs after resume"
    assert not resumed.interrupted and resumed.state.global_step == 8
    # Same data order, RNG and optimizer state: the interrupted-and-resumed run ends bitwise where the other does.
    expected = _params(reference.model)
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), f"{name} differs from the uninterrupted run"
    if impl == "triton":
        assert reference.sparse_optimizer._fast is not None and reference.sparse_optimizer._fast.done == 7


def test_sigint_callback_only_stops_after_a_signal(tiny_llama, tmp_path):
    callback = SigintCheckpointCallback()
    trainer = Trainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path, max_steps=3), train_dataset=_Tokens(),
                      callbacks=[callback])
    trainer.train()
    assert callback.stopped_at is None and trainer.state.global_step == 3
    assert not list(tmp_path.glob("checkpoint-*"))


def test_plain_trainer_and_plain_loop_snippets(tiny_llama, tmp_path):
    # The README's Trainer snippet (sparse_adamw.pipeline.trainer's docstring).
    model, masks = _pruned(tiny_llama)
    params = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = SparseAdamW(params, lr=3e-3, masks="auto")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_Tokens(),
                      optimizers=(optimizer, None), callbacks=[SigintCheckpointCallback()])
    trainer.train()
    for name, p in model.named_parameters():
        if name in masks:
            assert pruned_blocks_are_zero(p, masks[name]), name

    # The plain loop, with gradient accumulation and clipping.
    model, masks = _pruned(tiny_llama)
    optimizer = SparseAdamW(model.parameters(), lr=3e-3, weight_decay=0.0, masks="auto")
    loader = torch.utils.data.DataLoader(_Tokens(), batch_size=2)
    accumulation = 2
    for step, batch in enumerate(loader):
        loss = model(**batch).loss / accumulation
        loss.backward()
        if (step + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in masks:
            assert pruned_blocks_are_zero(p, masks[name]), name
            assert torch.equal(optimizer.state[p]["block_mask"], masks[name]), name


def test_sparse_trainer_refuses_another_optimizer(tiny_llama, tmp_path):
    model, _ = _pruned(tiny_llama)
    with pytest.raises(TypeError, match="SparseAdamW"):
        SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(),
                      optimizers=(torch.optim.AdamW(model.parameters()), None))


def test_step_log_lines(tiny_llama, tmp_path, capsys):
    trainer = SparseTrainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path, max_steps=4, logging_steps=2),
                            train_dataset=_Tokens(), callbacks=[StepLogCallback()])
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Step ")]
    assert [line.split(":")[0] for line in lines] == ["Step 2", "Step 4"]
    assert all(line.split(": loss=")[1][:6].replace(".", "").isdigit() for line in lines), lines
