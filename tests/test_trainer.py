"""SparseTrainer: optimizer groups and masks, sparsity kept and checked, clipping by the live blocks' norm, Ctrl+C
and SIGTERM checkpoints and exact resume, the tied-weights note on resume, the step log and its progress line."""
import collections
import io
import logging
import math
import os
import re
import signal
import sys
import types

import pytest
import torch
from transformers import Trainer, TrainerCallback

from finetune_helpers import ArithmeticTokens as _Tokens, Logged, LossLog, SigintAt, pruned_blocks_are_zero
from finetune_helpers import trainer_args as _args
from sparse_adamw import SparseAdamW
from sparse_adamw import masks as masks_module
from sparse_adamw.masks import (block_mask_from_zeros, expand_block_mask, save_masks)
from sparse_adamw.pipeline.prune import prune_magnitude
from sparse_adamw.pipeline.trainer import (
    SigintCheckpointCallback,
    SignalCheckpointCallback,
    SparseTrainer,
    SparsityViolation,
    StepLogCallback,
    linear_block_masks,
)


pytestmark = pytest.mark.usefixtures("one_thread")


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


class _LeakAt(TrainerCallback):
    """At the end of optimizer step `step`, writes a nonzero into pruned block (row, col) of `param` through
    param.data (as code that writes the weights behind the optimizer's back would)."""

    def __init__(self, param, block, step):
        self.param, self.block, self.step = param, block, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            row, col = self.block
            self.param.data[16 * row + 3, 16 * col + 5] = 1e-3


def test_a_pruned_block_made_nonzero_during_a_run_that_saves_nothing_fails_train(tiny_llama, tmp_path):
    """save_strategy "no": no checkpoint and no save_model checks the weights on the way, so the check at the end
    of train() is what catches a pruned block that became nonzero during training (here at the last step, after
    the optimizer's last update)."""
    model, masks = _pruned(tiny_llama)
    name, mask = next(iter(masks.items()))
    block = tuple((~mask).nonzero()[0].tolist())
    trainer = SparseTrainer(model=model, args=_args(tmp_path, max_steps=3, save_strategy="no"),
                            train_dataset=_Tokens(), callbacks=[_LeakAt(_params(model)[name], block, step=3)])
    with pytest.raises(SparsityViolation, match=rf"at the end of training: {re.escape(name)}: 1 of "):
        trainer.train()
    assert trainer.state.global_step == 3  # the whole run happened; only its end found the leak
    assert not pruned_blocks_are_zero(_params(model)[name], mask)
    assert not list(tmp_path.glob("checkpoint-*"))


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
                                callbacks=[SigintAt(3)])
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


# ----------------------------------------------------------------------------------- clipping: the live blocks' norm
def _live_norm(model, masks):
    """The gradient norm over the live blocks (whole parameters where there is no mask), in float64, the plain way."""
    parts = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().double()
            parts.append(g[expand_block_mask(masks[name], g.shape)] if name in masks else g.reshape(-1))
    return float(torch.linalg.vector_norm(torch.cat(parts)))


class _PoisonPrunedGradients:
    """Gradient hooks that write NaN, +inf or -inf (by turns) into every pruned block of each masked weight's
    gradient, and nowhere else."""

    def __init__(self, model, masks):
        self.calls, self.handles = 0, []
        params = _params(model)
        for i, (name, mask) in enumerate(sorted(masks.items())):
            pruned = ~expand_block_mask(mask, params[name].shape)
            value = (math.nan, math.inf, -math.inf)[i % 3]
            self.handles.append(params[name].register_hook(
                lambda grad, pruned=pruned, value=value: self._fill(grad, pruned, value)))

    def _fill(self, grad, pruned, value):
        self.calls += 1
        return grad.masked_fill(pruned, value)


class _LiveNormRecorder(SparseTrainer):
    """Records the test's own live-block norm of the gradients just before the Trainer clips them (or, without
    clipping, measures them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.live_norms = []

    def _clip_grad_norm(self, model):
        self.live_norms.append(_live_norm(self.model, self.masks))
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            self.live_norms.append(_live_norm(self.model, self.masks))
        return super()._get_grad_norm(model, grad_norm)


def _train_recording(tiny_llama, output_dir, poison, max_grad_norm):
    model, masks = _pruned(tiny_llama)
    poisoned = _PoisonPrunedGradients(model, masks) if poison else None
    log = Logged("grad_norm")
    trainer = _LiveNormRecorder(model=model, train_dataset=_Tokens(), callbacks=[log],
                                args=_args(output_dir, max_steps=4, logging_steps=1, max_grad_norm=max_grad_norm))
    trainer.train()
    return trainer, masks, log.values, poisoned


@pytest.mark.parametrize("max_grad_norm", [0.1, 0.0])
def test_nan_and_inf_in_pruned_gradients_do_not_reach_the_live_weights(tiny_llama, tmp_path, max_grad_norm):
    """The Trainer clips (max_grad_norm 0.1: every step) or only measures (0) the gradient norm. Over whole
    gradients either would be NaN, and clipping by it would turn every weight into NaN; over the live blocks the run
    is the clean twin's, bit for bit, and the logged grad_norm is the live blocks' norm."""
    clean, masks, clean_norms, _ = _train_recording(tiny_llama, tmp_path / "clean", False, max_grad_norm)
    poisoned, _, norms, hooks = _train_recording(tiny_llama, tmp_path / "poisoned", True, max_grad_norm)
    assert hooks.calls == 4 * 2 * len(masks)  # every micro-batch's gradient of every masked weight
    expected = _params(clean.model)
    for name, p in poisoned.model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} has non-finite entries"
        assert torch.equal(p, expected[name]), f"{name} differs from the run with clean gradients"
        if name in masks:
            assert pruned_blocks_are_zero(p, masks[name]), name
    for trainer, logged in ((clean, clean_norms), (poisoned, norms)):
        assert len(logged) == len(trainer.live_norms) == 4
        assert logged == pytest.approx(trainer.live_norms, rel=1e-5)
        assert all(norm > 0.1 for norm in logged)  # with max_grad_norm 0.1, every step was clipped
    assert norms == clean_norms


# --------------------------------------------------------------------------------------------------------- SIGTERM
class _SigtermAt(TrainerCallback):
    """Sends this process a real SIGTERM at the end of optimizer step `step`, as a batch scheduler does, but only
    when a handler is installed (without one, SIGTERM would kill the test run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler installed"
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_stops_like_ctrl_c(tiny_llama, tmp_path, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = SparseTrainer(model=_pruned(tiny_llama)[0], args=_args(tmp_path), train_dataset=_Tokens(),
                            callbacks=[_SigtermAt(3)])
    trainer.train()
    assert trainer.interrupted and trainer.state.global_step == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, "handlers not restored"
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    assert "SIGTERM: saving a checkpoint at the end of this step" in capsys.readouterr().err
    assert SigintCheckpointCallback is SignalCheckpointCallback  # the old name still works


# ----------------------------------------------------------------------------------- resuming with tied weights
def _tied_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    prune_magnitude(model, 0.25, progress=False)
    return model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _resume_warnings(checkpoint, output_dir):
    records = _Records()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(records)
    try:
        trainer = SparseTrainer(model=_tied_llama(seed=1), args=_args(output_dir, max_steps=3), train_dataset=_Tokens())
        trainer.train(resume_from_checkpoint=str(checkpoint))
    finally:
        trainer_logger.removeHandler(records)
    return [m for m in records.messages if "missing keys" in m]


def test_resume_with_tied_embeddings_warns_only_about_keys_really_missing(tmp_path):
    """The checkpoint of a model with tie_word_embeddings=True holds model.embed_tokens.weight but not its tied
    lm_head.weight: no warning for that. A key that is really missing still gets one."""
    import safetensors.torch

    first = SparseTrainer(model=_tied_llama(), args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                          train_dataset=_Tokens())
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert _resume_warnings(checkpoint, tmp_path / "a") == []

    for removed, expected in (("model.norm.weight", ["model.norm.weight"]),
                              ("model.embed_tokens.weight", ["lm_head.weight", "model.embed_tokens.weight"])):
        safetensors.torch.save_file({k: v for k, v in weights.items() if k != removed},
                                    checkpoint / "model.safetensors", metadata={"format": "pt"})
        warnings = _resume_warnings(checkpoint, tmp_path / removed)
        assert len(warnings) == 1, warnings
        assert sorted(re.findall(r"'([\w.]+)'", warnings[0])) == expected, warnings


# ------------------------------------------------------------------------------------- the step log, faked time
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class _Stream(io.StringIO):
    """A stream that says whether it is a terminal, and notes the clock at every line it is given."""

    def __init__(self, tty, clock):
        super().__init__()
        self.tty, self.clock, self.line_times = tty, clock, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.line_times += [self.clock()] * text.count("\n")
        return super().write(text)


def _drive(callback, clock, steps=20, accumulation=4, substep_s=2.0, logging_steps=10, between=None):
    """Runs `callback` through a fake training of `steps` optimizer steps of `accumulation` micro-batches of
    `substep_s` seconds each, with a loss logged every `logging_steps` steps; `between(step)` runs after each step."""
    state = types.SimpleNamespace(global_step=0, max_steps=steps, is_world_process_zero=True)
    args = control = None
    callback.on_train_begin(args, state, control)
    for step in range(1, steps + 1):
        for micro in range(1, accumulation + 1):
            clock.now += substep_s
            if micro < accumulation:
                callback.on_substep_end(args, state, control)
        state.global_step = step
        callback.on_step_end(args, state, control)
        if step % logging_steps == 0:
            callback.on_log(args, state, control, logs={"loss": 2.5 - step / 100, "learning_rate": 1e-4})
        if between is not None:
            between(step)
    callback.on_log(args, state, control, logs={"train_runtime": steps * accumulation * substep_s, "train_loss": 2.4})
    callback.on_train_end(args, state, control)


STEP_LINE = re.compile(r"^Step (\d+): loss=(\d+\.\d{4})\b")


def test_step_log_in_a_log_file_has_a_heartbeat_between_logging_steps():
    clock = _Clock()
    stream = _Stream(tty=False, clock=clock)
    _drive(StepLogCallback(stream=stream, clock=clock), clock)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    steps = [line for line in lines if STEP_LINE.match(line)]
    assert [STEP_LINE.match(line).group(1) for line in steps] == ["10", "20"]
    assert steps[0] == "Step 10: loss=2.4000  (lr 0.0001, 8.00 s/step, 1 min 20 s left)"
    heartbeats = [line for line in lines if line.startswith("step ")]
    assert "step 2/20, 8.00 s/step, 2 min 24 s left" in heartbeats
    assert len(heartbeats) + len(steps) + 1 == len(lines)  # and the Training: summary
    assert lines[-1] == "Training: 20 steps in 2 min 40 s, mean loss 2.4000"
    # Never more than 15 s of silence, give or take one micro-batch (the callback runs between micro-batches).
    times = [1000.0] + stream.line_times
    assert max(b - a for a, b in zip(times, times[1:])) <= 15.0 + 2.0


def _render(text):
    """The lines a terminal shows for `text`: '\\r' returns to the start of the line, characters overwrite."""
    screen, row, col = [[]], 0, 0
    for char in text:
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            if row == len(screen):
                screen.append([])
        else:
            line = screen[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
    return ["".join(line).rstrip() for line in screen]


def test_step_log_on_a_terminal_redraws_one_progress_line_and_never_tears(monkeypatch):
    clock = _Clock()
    stream = _Stream(tty=True, clock=clock)
    monkeypatch.setattr(sys, "stdout", stream)  # the terminal: print() from anyone goes there too
    handler = logging.StreamHandler(stream)
    chatty = logging.getLogger("sparse_adamw.test_progress")
    chatty.addHandler(handler)
    seen = {}

    def others_write(step):
        if step == 5:
            print("a print from elsewhere")
        if step == 15:
            chatty.warning("a warning from a logger")
        if step == 7:
            seen["drawn"] = _render(stream.getvalue())[-1]

    try:
        _drive(StepLogCallback(stream=stream, clock=clock), clock, between=others_write)
    finally:
        chatty.removeHandler(handler)
    assert sys.stdout is stream and handler.stream is stream  # given back at the end of training
    assert seen["drawn"] == "step 7/20, 8.00 s/step, 1 min 44 s left"
    assert "\rstep 13/20, 8.00 s/step, 56 s left" in stream.getvalue()
    shown = [line for line in _render(stream.getvalue()) if line.strip()]
    assert shown == [
        "a print from elsewhere",
        "Step 10: loss=2.4000  (lr 0.0001, 8.00 s/step, 1 min 20 s left)",
        "a warning from a logger",
        "Step 20: loss=2.3000  (lr 0.0001, 8.00 s/step)",
        "Training: 20 steps in 2 min 40 s, mean loss 2.4000",
    ]


@pytest.mark.gpu
def test_bf16_weights_with_gradient_checkpointing_on_the_gpu(tiny_llama, tmp_path):
    """The 7B headline's setting, small: bf16 weights and gradients (stochastic rounding, compact bf16 states,
    the Triton backend), gradient checkpointing on. It trains like the same run without checkpointing (the
    recomputed forward gives the same gradients), and the pruned blocks stay exactly zero."""
    runs = {}
    for checkpointing in (False, True):
        model, masks = _pruned(tiny_llama)
        model = model.to("cuda", torch.bfloat16)
        losses = LossLog()
        args = _args(tmp_path / str(checkpointing), use_cpu=False, max_steps=12, logging_steps=3,
                     learning_rate=1e-2, gradient_checkpointing=checkpointing)
        args._n_gpu = 1  # one process, one GPU: on a host with several the Trainer would use nn.DataParallel
        trainer = SparseTrainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[losses],
                                state_dtype=torch.bfloat16)
        trainer.train()
        optimizer = trainer.sparse_optimizer
        assert list(optimizer._backends.values())[0].__name__.endswith("triton_impl")
        params = _params(model)
        for name, mask in masks.items():
            p = params[name]
            assert p.dtype == torch.bfloat16 and optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
            assert pruned_blocks_are_zero(p.cpu(), mask), name
        # It learns (on an H200, one GPU: 5.52, 5.21, 5.26, 5.11 at steps 3, 6, 9 and 12 without checkpointing).
        assert sum(losses.losses[-2:]) / 2 < 0.96 * losses.losses[0], losses.losses
        runs[checkpointing] = losses.losses
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)
