"""SparseTrainer on 2 CPU processes with gloo: under DDP, its gradients live in DDP's buckets; under the Trainer's
FSDP2 path (accelerate's fully_shard preparation), the masks reach the DTensor shards that accelerate swaps into the
optimizer, the pruned blocks stay exactly zero, the loss follows the one-process run, and a checkpoint
(SparseAdamW.full_state_dict in optimizer.pt) resumes bit for bit (and from per-rank optimizer files with
SHARDED_STATE_DICT).

accelerate runs FSDP on accelerators only: on the CPU its AcceleratorState quietly drops the FSDP plugin and
trains with DDP. `_CpuFsdpTrainer` puts the plugin back after the Accelerator is made; everything after that
(prepare, fully_shard, the optimizer swap, clipping, the FSDP checkpoint files) is accelerate's and
transformers' own code. What this cannot cover, NCCL and CUDA, the GPU hosts run (README, "Several GPUs"); the
one GPU test here trains with Liger-Kernel under DDP and FSDP2 over NCCL.
"""
import os
import socket
import types

import pytest
import torch
from transformers import TrainerCallback

from finetune_helpers import ArithmeticTokens, LossLog, pruned_blocks_are_zero, pruned_tiny_model, trainer_args
from sparse_adamw.pipeline.trainer import SparseTrainer
from tests.utils import spawn_ranks

STEPS, SAVE_AT = 6, 3
# hidden 48, intermediate 80: rank 1's shard of every Linear weight starts mid-block (row 24, 12 or 40).
SIZES = dict(hidden_size=48, intermediate_size=80)


class _CpuFsdpTrainer(SparseTrainer):
    """SparseTrainer with accelerate's FSDP plugin restored on the CPU (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        # AcceleratorState copies PartialState's distributed_type whenever it is constructed again: set both, as
        # accelerate itself does on GPUs.
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def _args(output_dir, **overrides):
    return trainer_args(output_dir, **{"gradient_accumulation_steps": 1, "max_steps": STEPS, "logging_steps": 1,
                                       **overrides})


def _fsdp_args(output_dir, **config):
    return _args(output_dir, ddp_backend="gloo", fsdp=True, fsdp_config={"version": 2, **config},
                 save_strategy="steps", save_steps=SAVE_AT)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _whole_params(model):
    from sparse_adamw.dtensor import full_tensor

    return {name: full_tensor(p).detach().clone() for name, p in model.named_parameters()}  # every rank gathers


def _become_rank(rank, world, port):
    """What torchrun would set for this spawned process."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _finish_rank(rank, result, out_dir):
    """A spawned rank's last act: save its result for the test, then leave."""
    os.makedirs(out_dir, exist_ok=True)
    torch.save(result, os.path.join(out_dir, f"result_rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # as in test_distributed: no interpreter teardown after the work is saved


def _two_ranks_and_one_process(worker, model_dir, out_dir, tmp_path, *worker_args, reference_args=None):
    """`worker` on 2 spawned ranks (their saved results), and the one-process run on the same global batch of 4 (the
    trainer and its logged losses), with `reference_args` if given."""
    spawn_ranks(worker, args=(2, _free_port(), str(model_dir), str(out_dir), *worker_args), nprocs=2)
    results = [torch.load(out_dir / f"result_rank{r}.pt", weights_only=False) for r in range(2)]
    losses = LossLog()
    args = reference_args or _args(tmp_path / "one", per_device_train_batch_size=4)
    reference = SparseTrainer(model=_load(model_dir), args=args, train_dataset=ArithmeticTokens(), callbacks=[losses])
    reference.train()
    return results, reference, losses


def _worker(rank, world, port, model_dir, out_dir):
    _become_rank(rank, world, port)
    result = {}
    losses = LossLog()
    trainer = _CpuFsdpTrainer(model=_load(model_dir), args=_fsdp_args(out_dir), train_dataset=ArithmeticTokens(),
                              callbacks=[losses])
    trainer.train()
    optimizer = trainer.sparse_optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    result["sharded"] = all(type(p).__name__ == "DTensor" for g in optimizer.param_groups for p in g["params"])
    result["masks"] = trainer.optimizer_masks()
    result["stray_state"] = [p for p in optimizer.state if id(p) not in names]
    result["local_rows"] = {names[id(p)]: p._local_tensor.shape[0] for p in optimizer.state}
    result["losses"] = losses.losses
    result["final"] = _whole_params(trainer.model)
    result["checked"] = trainer.verify_sparsity()
    result["files"] = sorted(os.listdir(os.path.join(out_dir, f"checkpoint-{SAVE_AT}")))

    # A fresh model resumes from the checkpoint: model, optimizer (full state dict), scheduler, RNG.
    resumed = _CpuFsdpTrainer(model=_load(model_dir), args=_fsdp_args(out_dir), train_dataset=ArithmeticTokens())
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, f"checkpoint-{SAVE_AT}"))
    result["resumed"] = _whole_params(resumed.model)
    result["resumed_steps"] = resumed.state.global_step

    # SHARDED_STATE_DICT: each rank saves and loads its own optimizer state.
    sharded_dir = os.path.join(out_dir, "sharded")
    args = _fsdp_args(sharded_dir, state_dict_type="SHARDED_STATE_DICT")
    _CpuFsdpTrainer(model=_load(model_dir), args=args, train_dataset=ArithmeticTokens()).train()
    result["sharded_files"] = sorted(os.listdir(os.path.join(sharded_dir, f"checkpoint-{SAVE_AT}")))
    resumed = _CpuFsdpTrainer(model=_load(model_dir), args=args, train_dataset=ArithmeticTokens())
    resumed.train(resume_from_checkpoint=os.path.join(sharded_dir, f"checkpoint-{SAVE_AT}"))
    result["resumed_sharded"] = _whole_params(resumed.model)

    _finish_rank(rank, result, out_dir)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_trainer_keeps_blocks_zero_follows_one_process_and_resumes_exactly(tiny_llama, tmp_path, one_thread):
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, **SIZES)
    # FSDP2 on 2 ranks, and the same global batch of 4 in one process without FSDP
    results, reference, losses = _two_ranks_and_one_process(_worker, model_dir, tmp_path / "fsdp", tmp_path)
    expected = {n: p.detach() for n, p in reference.model.named_parameters()}

    for rank, result in enumerate(results):
        assert result["sharded"], "accelerate did not swap the DTensor shards into the optimizer"
        assert not result["stray_state"], "optimizer state left under the swapped-out whole parameters"
        assert set(result["masks"]) == set(masks), f"rank {rank}: masks for {sorted(result['masks'])}"
        for name, mask in masks.items():
            assert torch.equal(result["masks"][name], mask), f"rank {rank}: {name} has another mask"
            assert result["local_rows"][name] < mask.shape[0] * 16, f"{name} is not sharded"
        assert result["checked"] == len(masks)
        assert "optimizer.pt" in result["files"] and "scheduler.pt" in result["files"], result["files"]
        assert result["resumed_steps"] == STEPS
        assert {"optimizer-rank0-of-2.pt", "optimizer-rank1-of-2.pt"} <= set(result["sharded_files"])
        assert "optimizer.pt" not in result["sharded_files"]
    final = results[0]["final"]
    for name, mask in masks.items():
        assert pruned_blocks_are_zero(final[name], mask), f"{name}: a pruned block became nonzero under FSDP2"
        assert torch.equal(results[1]["final"][name], final[name])
    # FSDP2 averages the two ranks' gradients; one process averages the batch of 4 at once: equal up to rounding.
    assert len(results[0]["losses"]) == len(losses.losses) == STEPS
    assert results[0]["losses"] == pytest.approx(losses.losses, rel=1e-5), (results[0]["losses"], losses.losses)
    assert losses.losses[-1] < losses.losses[0]
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=5e-5, msg=lambda m: f"{name}: {m}")
    # The resumed run continues from optimizer.pt (the whole-parameter state) to the same bits.
    for name, value in final.items():
        assert torch.equal(results[0]["resumed"][name], value), f"{name} differs after resuming under FSDP2"
        assert torch.equal(results[0]["resumed_sharded"][name], value), f"{name}: resumed from per-rank files"


class _GradientStorage(TrainerCallback):
    """Before each optimizer step: how many distinct storages hold the gradients, and how many gradients there are."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.seen.append((len({g.untyped_storage().data_ptr() for g in grads}), len(grads)))


def _ddp_worker(rank, world, port, model_dir, out_dir):
    _become_rank(rank, world, port)
    model = _load(model_dir)
    storage, losses = _GradientStorage(model), LossLog()
    args = _args(out_dir, ddp_backend="gloo", per_device_train_batch_size=1, gradient_accumulation_steps=2)
    trainer = SparseTrainer(model=model, args=args, train_dataset=ArithmeticTokens(), callbacks=[storage, losses])
    trainer.train()
    result = {"seen": storage.seen, "losses": losses.losses, "checked": trainer.verify_sparsity(),
              "final": {n: p.detach().clone() for n, p in model.named_parameters()}}
    _finish_rank(rank, result, out_dir)


def test_under_ddp_the_gradients_live_in_ddps_buckets_and_training_follows_one_process(tiny_llama, tmp_path,
                                                                                       one_thread):
    """gradient_as_bucket_view: the gradients are views into DDP's few all-reduce buckets rather than one tensor
    each (a second copy of every gradient), and the run still equals the one-process run on the same global batch,
    accumulation included, with pruned blocks exactly zero."""
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, **SIZES)
    results, reference, losses = _two_ranks_and_one_process(_ddp_worker, model_dir, tmp_path / "ddp", tmp_path)
    for rank, result in enumerate(results):
        assert len(result["seen"]) == STEPS
        for buckets, grads in result["seen"]:
            assert grads == len(list(reference.model.parameters())) and buckets < grads / 4, (rank, buckets, grads)
        assert result["checked"] == len(masks)
        for name, mask in masks.items():
            assert pruned_blocks_are_zero(result["final"][name], mask), f"{name}: a pruned block became nonzero"
    assert results[0]["losses"] == pytest.approx(losses.losses, rel=1e-5), (results[0]["losses"], losses.losses)
    for name, value in reference.model.named_parameters():
        assert torch.equal(results[1]["final"][name], results[0]["final"][name])
        torch.testing.assert_close(results[0]["final"][name], value.detach(), rtol=0, atol=5e-5)


def _sharded_worker(rank, world, port, model_dir, out_dir):
    """The same run under DDP and under the sharded step (no clipping: the two are then bitwise equal), each saving
    at step SAVE_AT; then the sharded run resumed from its checkpoint."""
    _become_rank(rank, world, port)
    result = {}
    for mode in ("ddp", "sharded"):
        losses = LossLog()
        args = _args(os.path.join(out_dir, mode), ddp_backend="gloo", per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, max_grad_norm=0.0, save_strategy="steps", save_steps=SAVE_AT)
        trainer = SparseTrainer(model=_load(model_dir), args=args, train_dataset=ArithmeticTokens(),
                                callbacks=[losses], data_parallel=mode)
        trainer.train()
        result[mode] = {"losses": losses.losses, "checked": trainer.verify_sparsity(),
                        "wrapped": type(trainer.model_wrapped).__name__,
                        "state_bytes": trainer.sparse_optimizer.state_bytes(),
                        "final": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    args = _args(os.path.join(out_dir, "sharded"), ddp_backend="gloo", per_device_train_batch_size=1,
                 gradient_accumulation_steps=2, max_grad_norm=0.0)
    resumed = SparseTrainer(model=_load(model_dir), args=args, train_dataset=ArithmeticTokens(),
                            data_parallel="sharded")
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "sharded", f"checkpoint-{SAVE_AT}"))
    result["resumed"] = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
    _finish_rank(rank, result, out_dir)


def test_sharded_step_trainer_equals_ddp_saves_its_format_and_resumes_exactly(tiny_llama, tmp_path, one_thread):
    """data_parallel="sharded": the model is not wrapped in DDP, each rank holds about half the optimizer state, and
    without clipping the run equals DDP's bit for bit, accumulation included: losses, weights, the checkpoint's
    optimizer.pt (gathered into the single-process format) and the saved model (host copies of the one weight
    buffer). Resumed from its checkpoint, it ends on the same bits."""
    from safetensors.torch import load_file

    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, **SIZES)
    out = tmp_path / "modes"
    spawn_ranks(_sharded_worker, args=(2, _free_port(), str(model_dir), str(out)), nprocs=2)
    results = [torch.load(out / f"result_rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, result in enumerate(results):
        ddp, sharded = result["ddp"], result["sharded"]
        assert ddp["wrapped"] == "DistributedDataParallel" and sharded["wrapped"] == "LlamaForCausalLM"
        assert sharded["checked"] == ddp["checked"] == len(masks)
        assert 0 < sharded["state_bytes"] < 0.75 * ddp["state_bytes"], (sharded["state_bytes"], ddp["state_bytes"])
        assert len(sharded["losses"]) == STEPS and sharded["losses"] == ddp["losses"]
        for name, value in ddp["final"].items():
            assert torch.equal(sharded["final"][name], value), f"rank {rank}: {name} differs from DDP's"
            assert torch.equal(result["resumed"][name], value), f"rank {rank}: {name} differs after resuming"
            if name in masks:
                assert pruned_blocks_are_zero(value, masks[name]), name
    checkpoint = {mode: out / mode / f"checkpoint-{SAVE_AT}" for mode in ("ddp", "sharded")}
    saved = {mode: torch.load(path / "optimizer.pt", weights_only=True) for mode, path in checkpoint.items()}
    assert saved["sharded"]["param_groups"] == saved["ddp"]["param_groups"]
    assert sorted(saved["sharded"]["state"]) == sorted(saved["ddp"]["state"])
    for index, state in saved["ddp"]["state"].items():
        for key, value in state.items():
            got = saved["sharded"]["state"][index][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (index, key)
    weights = {mode: load_file(path / "model.safetensors") for mode, path in checkpoint.items()}
    assert sorted(weights["sharded"]) == sorted(weights["ddp"])
    for name, value in weights["ddp"].items():
        assert torch.equal(weights["sharded"][name], value), name


def _forward_module(model):
    """Where the model's forward comes from: Liger rebinds it on the instance (the class keeps its name)."""
    return model.forward.__func__.__module__


def _liger_gpu_args(output_dir, **overrides):
    return _args(output_dir, use_cpu=False, use_liger_kernel=True, **overrides)


def _liger_gpu_worker(rank, world, port, model_dir, out_dir, mode):
    """DDP, FSDP2 or the sharded step over NCCL with Liger-Kernel, one GPU per rank; each rank saves the whole trained
    weights."""
    _become_rank(rank, world, port)
    torch.cuda.set_device(rank)
    sharding = {"fsdp": True, "fsdp_config": {"version": 2}} if mode == "fsdp2" else {}
    losses = LossLog()
    trainer = SparseTrainer(model=_load(model_dir), args=_liger_gpu_args(out_dir, **sharding),
                            train_dataset=ArithmeticTokens(), callbacks=[losses],
                            data_parallel="sharded" if mode == "sharded" else "ddp")
    trainer.train()
    result = {"losses": losses.losses, "final": {n: p.cpu() for n, p in _whole_params(trainer.model).items()},
              "forward": _forward_module(trainer.model)}
    _finish_rank(rank, result, out_dir)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fsdp2", "ddp", "sharded"])
def test_liger_on_two_gpus_trains_lm_head_like_one_process(mode, tiny_llama, tmp_path):
    """Liger's fused linear cross-entropy reads lm_head.weight without calling lm_head, and accelerate shards
    [final norm, lm_head] as one FSDP2 unit, so FSDP2 warns that lm_head "did not run forward before backward".
    The unit is still gathered (the norm runs) and its gradients still reduced: every weight, lm_head included,
    ends where one process with Liger on the same global batch of 4 ends, and pruned blocks stay exactly zero. Under
    the sharded step the head's weights travel by copy engine and are waited for at the final norm (Liger reads
    them without calling lm_head)."""
    pytest.importorskip("liger_kernel")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model_dir, masks = pruned_tiny_model(tmp_path / "pruned_model", tiny_llama, **SIZES)
    initial = {n: p.detach().clone() for n, p in _load(model_dir).named_parameters()}
    args = _liger_gpu_args(tmp_path / "one", per_device_train_batch_size=4)
    args._n_gpu = 1  # one process on one GPU of several: without this the Trainer would wrap it in DataParallel
    results, reference, losses = _two_ranks_and_one_process(_liger_gpu_worker, model_dir, tmp_path / mode, tmp_path,
                                                            mode, reference_args=args)
    assert _forward_module(reference.model).startswith("liger_kernel"), _forward_module(reference.model)
    assert all(r["forward"].startswith("liger_kernel") for r in results), [r["forward"] for r in results]
    assert results[0]["losses"] == pytest.approx(losses.losses, rel=1e-3), (results[0]["losses"], losses.losses)
    final = results[0]["final"]
    for name, value in reference.model.named_parameters():
        expected, start = value.detach().cpu(), initial[name]
        assert torch.equal(results[1]["final"][name], final[name]), f"{name} differs between the ranks"
        # GPU matmuls of 2 x 2 and of 4 sequences round differently: compare each weight's change over the run.
        moved = (expected - start).norm()
        assert moved > 0, name
        assert ((final[name] - expected).norm() / moved).item() < 1e-2, f"{name} under {mode} with Liger"
        if name in masks:
            assert pruned_blocks_are_zero(final[name], masks[name]), f"{name}: a pruned block became nonzero"


class _Fsdp1Trainer(SparseTrainer):
    """What SparseTrainer sees under FSDP1: accelerate's FSDP1 plugin cannot even be built without a GPU, so only
    the version it reports is faked here."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.state.fsdp_plugin = types.SimpleNamespace(fsdp_version=1)
        self.is_fsdp_enabled = True


def test_fsdp1_is_refused(tiny_llama, tmp_path):
    with pytest.raises(NotImplementedError, match='FSDP1: its flat parameters .*"version": 2'):
        _Fsdp1Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=ArithmeticTokens())


def test_fsdp_on_the_cpu_is_refused_by_finetune():
    from sparse_adamw.pipeline.finetune_config import _split, build_parser, resolve_arguments

    args, training = _split(build_parser().parse_args(["--model", "m", "--fsdp"]))
    with pytest.raises(ValueError, match="--fsdp needs GPUs"):
        resolve_arguments(args, training, cuda_available=False, bf16_supported=False, world_size=2)
    args, training = _split(build_parser().parse_args(["--model", "m", "--fsdp"]))
    with pytest.raises(ValueError, match="--fsdp shards over several processes"):
        resolve_arguments(args, training, cuda_available=True, bf16_supported=True, world_size=1)
    args, training = _split(build_parser().parse_args(["--model", "m", "--fsdp"]))
    plan = resolve_arguments(args, training, cuda_available=True, bf16_supported=True, world_size=2)
    assert plan.training["fsdp"] is True and plan.training["fsdp_config"]["version"] == 2
    assert plan.training["gradient_accumulation_steps"] == 4  # the effective batch stays 8


def test_print_config_says_fsdp(capsys):
    from sparse_adamw.pipeline.banner import print_config
    from sparse_adamw.pipeline.finetune_config import _split, build_parser, resolve_arguments

    for argv, expected in ((["--model", "m"], "FSDP=0"), (["--model", "m", "--fsdp"], "FSDP=1")):
        args, training = _split(build_parser().parse_args(argv))
        print_config(resolve_arguments(args, training, cuda_available=True, bf16_supported=True, world_size=2))
        assert expected in capsys.readouterr().out.splitlines()
