"""How `--data_parallel` resolves, and what the banner says about it (sparse_adamw/pipeline/parallel_mode.py):
the sharded step where GPUs of one host reach each other's memory, DDP elsewhere, and a word where the chosen mode
has not been measured (more GPUs than the 2 it was measured on, or GPUs linked by PCIe only)."""
import pytest

from sparse_adamw.pipeline import parallel_mode
from sparse_adamw.pipeline.banner import print_config
from sparse_adamw.pipeline.finetune_config import _split, build_parser, resolve_arguments


def _plan(monkeypatch, *flags, cuda=True, world=2, peers=True, nvlink=True, local=None):
    monkeypatch.setattr(parallel_mode, "peers_reachable", lambda n: peers)
    monkeypatch.setattr(parallel_mode, "nvlink_between", lambda n: nvlink)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    args, training = _split(build_parser().parse_args(["--model", "m", *flags]))
    return resolve_arguments(args, training, cuda_available=cuda, bf16_supported=cuda, world_size=world)


def test_data_parallel_auto_picks_the_sharded_step_on_one_host_whose_gpus_reach_each_other(monkeypatch):
    def resolved(*flags, cuda=True, world=2, peers=True, local=None):
        return _plan(monkeypatch, *flags, cuda=cuda, world=world, peers=peers, local=local).args

    assert resolved().data_parallel == "sharded"
    assert resolved(local=2).data_parallel == "sharded"
    assert resolved(world=4, local=2).data_parallel == "ddp"  # two nodes
    assert resolved(peers=False).data_parallel == "ddp"  # GPUs without peer access
    assert resolved("--fsdp").data_parallel == "ddp"
    assert resolved(cuda=False).data_parallel == "ddp"
    assert resolved(world=1).data_parallel == "ddp"
    assert resolved("--data_parallel", "ddp").data_parallel == "ddp"
    assert resolved("--data_parallel", "sharded", cuda=False).data_parallel == "sharded"  # gloo: for tests
    for flags, kwargs, message in ((("--fsdp",), {}, "pick one"), ((), {"world": 1}, "launch it with torchrun"),
                                   ((), {"world": 4, "local": 2}, "spans several nodes")):
        with pytest.raises(ValueError, match=message):
            resolved("--data_parallel", "sharded", *flags, **kwargs)


@pytest.mark.parametrize("kwargs, mode, says", [
    (dict(world=2), "sharded", "(measured on 2 H200s joined by NVLink"),
    (dict(world=4), "sharded", "; not measured on 4 GPUs yet: --data_parallel ddp runs DDP instead"),
    (dict(world=8), "sharded", "; not measured on 8 GPUs yet"),
    (dict(world=2, nvlink=False), "sharded", "; not measured on 2 GPUs linked by PCIe only yet"),
    (dict(world=2, nvlink=None), "sharded", "(measured on 2 H200s"),  # NVML cannot tell: the measured case
    (dict(world=2, peers=False), "ddp", "auto: DDP, since the sharded step needs the GPUs of one host that reach "
                                        "each other (GPUs that cannot map each other's memory"),
    (dict(world=4, local=2), "ddp", "(several nodes)"),
    (dict(world=2, cuda=False), "ddp", "(the CPU)"),
])
def test_auto_says_what_it_chose_and_whether_that_is_measured(monkeypatch, kwargs, mode, says):
    plan = _plan(monkeypatch, **kwargs)
    assert plan.args.data_parallel == mode and says in plan.data_parallel_why, plan.data_parallel_why
    assert plan.data_parallel_why.startswith("auto: ")


def test_an_explicit_mode_and_one_process(monkeypatch):
    assert _plan(monkeypatch, "--data_parallel", "ddp", world=4).data_parallel_why == "as asked (--data_parallel ddp)"
    one = _plan(monkeypatch, world=1)
    assert one.args.data_parallel == "ddp" and one.data_parallel_why == ""


def test_the_banner_gets_the_reason(monkeypatch, capsys):
    print_config(_plan(monkeypatch, world=4))
    lines = capsys.readouterr().out.splitlines()
    assert "DATA_PARALLEL=sharded" in lines
    why = next(line for line in lines if line.startswith("DATA_PARALLEL_WHY="))
    assert "not measured on 4 GPUs yet" in why
