"""Backend selection, the compiled extension's build and errors, and what only the compiled kernels have.

The update itself is checked against the reference for every backend by test_kernels.py and test_rounding.py.
"""
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
import setuptools
import torch

from sparse_adamw import SparseAdamW, apply_block_mask_, random_block_mask
from sparse_adamw import backends
from sparse_adamw.backends import (BackendUnavailable, LaunchConfig, ParamUpdate, build, ext_impl, select_backend,
                                   torch_impl)
from sparse_adamw.layout import BlockLayout, compact_to_dense, new_state
from sparse_adamw.masks import expand_block_mask
from sparse_adamw.reference import step_constants
from tests.test_kernels import DEVICES, HYPER, _check_step, _poison_grad, _skip_unrunnable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = [pytest.param("cpp", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def fresh_caches(monkeypatch):
    """Forget loaded and failed backends, for this test only."""
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_failed", {})


def _without_extension(monkeypatch, tmp_path, root=ROOT):
    """As if sparse_adamw._C were not installed and nothing built, with the sources in `root`/csrc."""
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "_installed", lambda cuda: None)
    monkeypatch.setattr(build, "ROOT", str(root))
    # Its own name: torch's JIT versioning per name would otherwise rebuild the real extension later on.
    monkeypatch.setattr(build, "_jit_name", lambda cuda: "sparse_adamw_C_test")
    monkeypatch.setenv("SPARSE_ADAMW_BUILD_DIR", str(tmp_path / "build"))


def _optimizer(params, masks=None, impl="auto", **kw):
    return SparseAdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                       weight_decay=HYPER["weight_decay"], masks=masks, impl=impl, **kw)


# ------------------------------------------------------------------------------------------------------ selection
@pytest.mark.gpu
def test_auto_takes_triton_for_cuda_tensors():
    """On a GPU with Triton, "auto" updates CUDA tensors with the Triton kernel (the fastest; benchmarks/RESULTS.md)."""
    from sparse_adamw.backends import triton_impl

    assert select_backend("auto", torch.device("cuda")) is triton_impl
    p = torch.randn(64, 64, device="cuda")
    p.grad = torch.randn_like(p)
    opt = _optimizer([p])
    opt.step()
    assert list(opt._backends.values()) == [triton_impl]


def test_env_var_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "torch")
    assert select_backend("auto", torch.device("cpu")) is torch_impl
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "cpp")
    assert select_backend("auto", torch.device("cpu")) is ext_impl
    assert select_backend("torch", torch.device("cpu")) is torch_impl  # an explicit argument wins
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "fortran")
    with pytest.raises(ValueError, match="SPARSE_ADAMW_IMPL"):
        select_backend("auto", torch.device("cpu"))


def test_env_var_picks_the_optimizer_backend(monkeypatch):
    monkeypatch.setenv("SPARSE_ADAMW_IMPL", "cpp")
    p = torch.randn(32, 32)
    p.grad = torch.randn(32, 32)
    opt = _optimizer([p])
    opt.step()
    assert list(opt._backends.values()) == [ext_impl]


def test_auto_compiles_the_cpu_extension_and_says_so(tmp_path, monkeypatch, fresh_caches, caplog):
    from torch.utils import cpp_extension

    _without_extension(monkeypatch, tmp_path)
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *a, **kw: built.append(name) or "a module")
    with caplog.at_level("WARNING", logger="sparse_adamw"):
        assert select_backend("auto", torch.device("cpu")) is ext_impl
    assert built == ["sparse_adamw_C_test"]
    assert "compiling the C++ extension" in caplog.text and "SPARSE_ADAMW_IMPL=torch" in caplog.text


def test_auto_falls_back_to_torch_when_the_build_fails(tmp_path, monkeypatch, fresh_caches, caplog):
    _without_extension(monkeypatch, tmp_path)

    def fail(cuda):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(build, "_jit_build", fail)
    with caplog.at_level("WARNING", logger="sparse_adamw"):
        assert select_backend("auto", torch.device("cpu")) is torch_impl
        assert "no compiler here" in caplog.text
        caplog.clear()
        assert select_backend("auto", torch.device("cpu")) is torch_impl
    assert caplog.text == ""  # said once, not retried


def test_auto_does_not_compile_the_cuda_extension(tmp_path, monkeypatch, fresh_caches):
    _without_extension(monkeypatch, tmp_path)
    monkeypatch.setattr(build, "_jit_build", lambda cuda: pytest.fail("auto started a CUDA build"))
    backends._failed["triton"] = ImportError("no triton here")
    assert select_backend("auto", torch.device("cuda")) is torch_impl


def test_auto_takes_the_built_extension(fresh_caches):
    build.extension(cuda=False)  # what impl="cpp" or `python -m sparse_adamw.backends.build` leaves behind
    assert build.is_built(cuda=False)
    assert select_backend("auto", torch.device("cpu")) is ext_impl


def test_a_built_extension_is_imported_without_ninja_or_its_lock(fresh_caches, monkeypatch):
    """Once built, each process (all the ranks of a distributed run start at once) imports the library itself:
    no ninja run and no wait on torch's build lock. While a lock says a build runs, cpp_extension.load waits."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(build, "_installed", lambda cuda: None)  # the JIT build, installed or not
    monkeypatch.setattr(build, "_modules", {})
    build.extension(cuda=False)  # built (at most once: the kernel tests build it too)
    build._modules.clear()
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **kw: pytest.fail("ran cpp_extension.load"))
    module = build.extension(cuda=False)
    assert module.__file__ == build._jit_library(False)
    p = torch.randn(40, 24)
    p.grad = torch.randn_like(p)
    reference = p.detach().clone()
    _optimizer([p], impl="cpp").step()
    assert not torch.equal(p, reference)  # the imported kernel stepped

    build._modules.clear()
    lock = os.path.join(build.jit_build_dir(False), "lock")
    open(lock, "w").close()
    waited = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *a, **kw: waited.append(name) or "loaded after the wait")
    try:
        assert build.extension(cuda=False) == "loaded after the wait" and waited
    finally:
        os.remove(lock)


def test_each_version_of_the_sources_builds_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Two checkouts of different versions share the build cache: neither may take the other's binary."""
    copy = tmp_path / "checkout"
    shutil.copytree(os.path.join(build.ROOT, "csrc"), copy / "csrc")
    monkeypatch.setenv("SPARSE_ADAMW_BUILD_DIR", str(tmp_path / "cache"))
    here = build.jit_build_dir(cuda=False)
    monkeypatch.setattr(build, "ROOT", str(copy))
    assert build.jit_build_dir(cuda=False) == here  # the same sources elsewhere: the same build
    with open(copy / "csrc" / "sparse_adamw.h", "a") as header:
        header.write("// another version\n")
    other = build.jit_build_dir(cuda=False)
    assert other != here and os.path.dirname(other) == os.path.dirname(here)
    assert build.jit_build_dir(cuda=True) not in (here, other)


def test_a_killed_build_leaves_no_lock_that_blocks_later_builds(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.write_text("")
    build.clear_stale_lock(str(tmp_path))  # fresh: another process may be building right now
    assert lock.exists() and "waiting for another process's build" in caplog.text
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    build.clear_stale_lock(str(tmp_path))
    assert not lock.exists() and f"removing the stale build lock {lock}" in caplog.text


def test_auto_falls_back_to_torch_for_float64():
    build.extension(cuda=False)
    p = torch.randn(16, 16, dtype=torch.float64)
    p.grad = torch.randn_like(p)
    opt = _optimizer([p], impl="auto")
    opt.step()
    assert list(opt._backends.values()) == [torch_impl]
    q = torch.randn(16, 16, dtype=torch.float64)
    q.grad = torch.randn_like(q)
    with pytest.raises(TypeError, match="does not support"):
        _optimizer([q], impl="cpp").step()


def test_explicit_backend_on_the_wrong_device():
    with pytest.raises(BackendUnavailable, match="CUDA tensors only"):
        select_backend("cuda", torch.device("cpu"))
    with pytest.raises(BackendUnavailable, match="CPU tensors only"):
        select_backend("cpp", torch.device("cuda"))


def test_unavailable_backend_carries_the_compile_error(tmp_path, monkeypatch, fresh_caches):
    """A real failed JIT build: the compiler's message reaches the user, the error is its cause, no retry."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in os.listdir(os.path.join(ROOT, "csrc")):  # every source broken: no file compiles for long
        (csrc / name).write_text('#error "deliberately broken for a test"\n')
    _without_extension(monkeypatch, tmp_path, root=tmp_path)
    with pytest.raises(BackendUnavailable, match="deliberately broken") as info:
        select_backend("cpp", torch.device("cpu"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "deliberately broken" in str(info.value.__cause__)
    monkeypatch.setattr(build, "_jit_build", lambda cuda: pytest.fail("a failed build was retried"))
    with pytest.raises(BackendUnavailable, match="deliberately broken"):
        select_backend("cpp", torch.device("cpu"))
    assert select_backend("auto", torch.device("cpu")) is torch_impl


def test_missing_sources_say_how_to_install(tmp_path, monkeypatch, fresh_caches):
    _without_extension(monkeypatch, tmp_path, root=tmp_path)
    with pytest.raises(BackendUnavailable, match="no-build-isolation") as info:
        select_backend("cpp", torch.device("cpu"))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_importing_compiles_nothing():
    code = ("import sys, sparse_adamw, sparse_adamw.backends.ext_impl, sparse_adamw.backends.build; "
            "sys.exit(any(m == 'sparse_adamw._C' or m.startswith('sparse_adamw_C') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# ---------------------------------------------------------------------------------------------------------- build
def _setup_kwargs(monkeypatch, block_torch=False, **env):
    """The keyword arguments setup.py passes to setuptools.setup, under the given environment."""
    for key in ("SPARSE_ADAMW_SKIP_BUILD", "SPARSE_ADAMW_SKIP_CUDA_BUILD", "SPARSE_ADAMW_CUDA_ARCHS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if block_torch:  # pip's isolated build environment
        for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torch", None)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def test_setup_builds_the_cpu_extension_where_torch_is_importable(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    (ext,) = kw["ext_modules"]
    assert ext.name == "sparse_adamw._C"
    cuda = torch.version.cuda is not None
    assert ext.sources == build.sources(cuda)
    assert "build_ext" in kw["cmdclass"]
    assert "torch" not in str(kw.get("setup_requires", ""))


@pytest.mark.parametrize("env", [{"block_torch": True}, {"SPARSE_ADAMW_SKIP_BUILD": "1"}])
def test_setup_skips_the_extension_quietly(monkeypatch, env):
    kw = _setup_kwargs(monkeypatch, **env)
    assert not kw.get("ext_modules")
    assert kw["name"] == "sparse_adamw"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile(tmp_path):
    """Syntax and type errors in the CUDA code show up here, on machines without a GPU: the kernel compiles to PTX
    (sm_80, C++17) without FMA, and the binding compiles with its CUDA branch."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # A CPU build of torch lacks this generated header; its macros only matter on Windows.
    includes.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    ptx = tmp_path / "kernel.ptx"
    nvcc = ["nvcc", "-ptx", "-arch=sm_80", "-std=c++17", *build.nvcc_flags(None), *cpp_extension.COMMON_NVCC_FLAGS,
            *includes, os.path.join(ROOT, build.CUDA_SOURCES[0]), "-o", str(ptx)]
    gxx = ["c++", "-fsyntax-only", "-std=c++17", *build.cxx_flags(True), *includes,
           "-DTORCH_EXTENSION_NAME=_C", os.path.join(ROOT, build.CPU_SOURCES[0])]
    jobs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for cmd in (nvcc, gxx)]  # side by side: each takes most of the time
    try:
        for cmd, job in jobs:
            _, err = job.communicate(timeout=900)
            assert job.returncode == 0, f"{' '.join(cmd)}\n{err[-4000:]}"
    finally:  # a compiler past its deadline (TimeoutExpired) or left running by a failed assertion
        for _, job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait(timeout=30)
    text = ptx.read_text()
    assert text.count(".entry") == 3 * 3 * 2 * 2 * 2  # param, grad, state dtypes x int32/int64 x vector/scalar
    assert "fma.rn.f32" not in text


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("c++") is None, reason="GNU/Linux toolchain")
def test_link_flags_keep_libstdcxx_shared_on_a_static_by_default_toolchain(tmp_path):
    """A toolchain that links libstdc++ statically by default (as -static-libstdc++ does here) put a second
    libstdc++ into the extension on the GPU machine, and formatting a number into an error message crashed there.
    With our link flags the library needs the shared libstdc++ and carries none of its code."""
    src = tmp_path / "t.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'std::string f(unsigned long n) { std::ostringstream s; s << n; return s.str(); }\n')

    def build_so(flags):
        out = tmp_path / f"t{len(flags)}.so"
        subprocess.run(["c++", "-shared", "-fPIC", str(src), "-o", str(out), "-static-libstdc++", *flags],
                       check=True, capture_output=True, timeout=300)
        needed = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True, timeout=60).stdout
        symbols = subprocess.run(["nm", "-C", str(out)], capture_output=True, text=True, timeout=60).stdout
        return "libstdc++.so" in needed, "codecvt" in symbols

    assert build_so([]) == (False, True)  # the failure mode: static
    assert build_so(build.ld_flags()) == (True, False)


def test_cuda_arch_flags():
    flags = build.nvcc_flags("80;9.0")
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for newer GPUs
    assert not any("arch" in f for f in build.nvcc_flags(None))  # torch's default: the visible GPU
    assert "--fmad=false" in flags and "-ffp-contract=off" in build.cxx_flags(False)


# ------------------------------------------------------------------------------------- the compiled kernels only
def _run_steps(impl, device, dtype, state_dtype, steps=5):
    """Params and states after `steps` steps of `impl` on one masked and one dense param (fixed inputs)."""
    gen = torch.Generator().manual_seed(1)
    shape, block = (75, 93), (16, 16)
    mask = random_block_mask(shape, 0.3, block, generator=gen)
    params = [apply_block_mask_(torch.randn(shape, generator=gen).to(dtype), mask, block).to(device),
              torch.randn(300, generator=gen).to(dtype).to(device)]
    opt = _optimizer(params, {params[0]: mask.to(device)}, impl=impl, state_dtype=state_dtype, seed=3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        opt.step()
    return [(p.cpu(), opt.state[p]["exp_avg"].cpu(), opt.state[p]["exp_avg_sq"].cpu()) for p in params]


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("impl,device", COMPILED)
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS)
def test_close_to_the_torch_backend_and_states_bitwise(impl, device, dtype, state_dtype):
    """Moments do not involve sqrt: bitwise equal. Params within an ulp or two: torch's CPU sqrt (MKL) is off by an
    ulp for about a fifth of inputs, while the compiled kernels round sqrt and division correctly."""
    ours, theirs = _run_steps(impl, device, dtype, state_dtype), _run_steps("torch", "cpu", dtype, state_dtype)
    for (p, m, v), (p_ref, m_ref, v_ref) in zip(ours, theirs):
        assert torch.equal(m, m_ref) and torch.equal(v, v_ref)
        eps = torch.finfo(dtype).eps  # near zero, where p - update cancels, the ulp is that of the operands
        torch.testing.assert_close(p, p_ref, rtol=2 * eps, atol=2 * eps * p_ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS)
def test_cuda_and_cpp_agree_bitwise(dtype, state_dtype):
    """One update function for both, no FMA contraction, IEEE sqrt and division: the same bits on GPU and CPU."""
    for a, b in zip(_run_steps("cuda", "cuda", dtype, state_dtype), _run_steps("cpp", "cpu", dtype, state_dtype)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("impl,device", COMPILED)
@pytest.mark.parametrize("blocks_per_program,threads,index_64,misaligned", [
    (1, 32, False, False), (3, 128, True, False), (8, 256, False, True), (64, 1024, True, True)])
def test_launch_variants(impl, device, blocks_per_program, threads, index_64, misaligned):
    """Blocks per program, threads, 64-bit offsets and unaligned storage (the CUDA kernel's scalar path)."""
    launch = LaunchConfig(blocks_per_program=blocks_per_program, threads=threads, index_64=index_64)
    shape, block = (70, 96), (16, 16)
    mask = random_block_mask(shape, 0.3, block)
    numel = shape[0] * shape[1]
    storage = torch.zeros(numel + 1, device=device)
    param = storage[int(misaligned):int(misaligned) + numel].view(shape)  # one element in: not 16-byte aligned
    param.copy_(apply_block_mask_(torch.randn(shape), mask))
    dense = torch.randn(150, device=device)
    opt = _optimizer([param, dense], {param: mask.to(device)}, impl=impl, launch=launch)
    live = expand_block_mask(mask, shape, block)
    before = (param.cpu().clone(), torch.zeros(shape), torch.zeros(shape))
    before_dense = (dense.cpu().clone(), torch.zeros(150), torch.zeros(150))
    for step in range(1, 6):
        grad, grad_dense = _poison_grad(torch.randn(shape), live), torch.randn(150)
        param.grad, dense.grad = grad.to(device), grad_dense.to(device)
        opt.step()
        before = _check_step(opt, param, before, grad, step, mask, block, "masked")
        before_dense = _check_step(opt, dense, before_dense, grad_dense, step, None, block, "dense")


@pytest.mark.parametrize("impl,device", COMPILED)
def test_one_call_per_dtype(impl, device, monkeypatch):
    calls = []
    ext = build.extension(cuda=device == "cuda")

    class Counting:
        def step(self, params, *args):
            calls.append(len(params))
            return ext.step(params, *args)

    monkeypatch.setitem(build._modules, device == "cuda", Counting())
    fp32 = [torch.randn(32, 48, device=device) for _ in range(5)] + [torch.randn(20, device=device)]
    bf16 = [torch.randn(16, 64, device=device, dtype=torch.bfloat16) for _ in range(4)]
    opt = _optimizer(fp32 + bf16, impl=impl)
    for p in fp32 + bf16:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [4, 6]


def _call_args(device="cpu"):
    """Valid arguments of _C.step: two masked (40, 48) fp32 params with 3 live 16x16 blocks, 2 blocks per program."""
    def zeros(*shape):
        return [torch.zeros(shape, device=device) for _ in range(2)]

    return dict(params=zeros(40, 48), grads=zeros(40, 48), exp_avgs=zeros(3, 16, 16), exp_avg_sqs=zeros(3, 16, 16),
                # rows, cols, numel, block columns, live blocks, first program, row shift, index base
                shapes=torch.tensor([[40, 48, 40 * 48, 3, 3, 0, 0, 0], [40, 48, 40 * 48, 3, 3, 2, 0, 0]]),
                hyper=torch.tensor([step_constants(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)] * 2, dtype=torch.float64),
                seeds=torch.zeros(0, dtype=torch.int64),
                prog_tensor=torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=device),
                block_ids=torch.tensor([0, 4, 8, 0, 1, 2, 3, 0], dtype=torch.int32, device=device),
                block_h=16, block_w=16, blocks_per_program=2, threads=128, index_64=False)


def _set(args, key, index, value):
    args[key][index] = value


BAD_CALLS = {
    "2 params but 1 grads": lambda a: a["grads"].pop(),
    "grads\\[1\\] is BFloat16; one launch takes Float": lambda a: _set(a, "grads", 1, a["grads"][1].bfloat16()),
    "grads\\[0\\] must be contiguous": lambda a: _set(a, "grads", 0, torch.zeros(48, 40).t()),
    "grads\\[1\\] has shape": lambda a: _set(a, "grads", 1, torch.zeros(48, 40)),
    "params\\[1\\] has shape": lambda a: (_set(a, "params", 1, torch.zeros(48, 40)),
                                          _set(a, "grads", 1, torch.zeros(48, 40))),
    "compact state needs": lambda a: (_set(a, "exp_avgs", 0, torch.zeros(3, 16, 8)),
                                      _set(a, "exp_avg_sqs", 0, torch.zeros(3, 16, 8))),
    "exp_avg_sqs\\[0\\] has shape": lambda a: _set(a, "exp_avg_sqs", 0, torch.zeros(4, 16, 16)),
    "param-shaped state needs": lambda a: (_set(a, "exp_avgs", 1, torch.zeros(40 * 48)),
                                           _set(a, "exp_avg_sqs", 1, torch.zeros(40 * 48))),
    "states must be float32 or bfloat16": lambda a: a.update(exp_avgs=[t.half() for t in a["exp_avgs"]],
                                                             exp_avg_sqs=[t.half() for t in a["exp_avg_sqs"]]),
    "params must be float32": lambda a: a.update(params=[t.double() for t in a["params"]],
                                                 grads=[t.double() for t in a["grads"]]),
    "hyper must have shape": lambda a: a.update(hyper=a["hyper"][:, :5].contiguous()),
    "hyper must be a contiguous Double": lambda a: a.update(hyper=a["hyper"].float()),
    "shapes must be a contiguous Long": lambda a: a.update(shapes=a["shapes"].int()),
    "params\\[0\\] has 1920 elements, its layout 1968": lambda a: a["shapes"].__setitem__((0, 2), 41 * 48),
    "13 live blocks of 9": lambda a: a["shapes"].__setitem__((1, 4), 13),
    "row shift 16 \\(0 to 15\\)": lambda a: a["shapes"].__setitem__((1, 6), 16),
    "tensor 1 has 3 block columns and first program 1": lambda a: a["shapes"].__setitem__((1, 5), 1),
    "tensor 0 has 4 block columns": lambda a: a["shapes"].__setitem__((0, 3), 4),
    "step constant 6 of tensor 1 is inf": lambda a: a["hyper"].__setitem__((1, 6), float("inf")),
    "stochastic rounding is for bfloat16": lambda a: a.update(seeds=torch.tensor([5, 6])),
    "seeds must be": lambda a: a.update(seeds=torch.tensor([5])),
    "need 8 block ids": lambda a: a.update(block_ids=a["block_ids"][:7]),
    "need 4 programs, prog_tensor has 5": lambda a: a.update(
        prog_tensor=torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32), block_ids=torch.zeros(10, dtype=torch.int32)),
    "program 1 belongs to tensor 0, prog_tensor says 1": lambda a: a["prog_tensor"].__setitem__(1, 1),
    "block id 12 of program 0": lambda a: a["block_ids"].__setitem__(1, 12),
    "must be contiguous 1-D int32": lambda a: a.update(block_ids=a["block_ids"].long()),
}


@pytest.mark.parametrize("impl,device", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_shards_match_the_whole_parameter(impl, device, dtype):
    """FSDP2 row shards that start inside a block row, masked and unmasked, in one call: the same bits as updating
    the whole parameter (stochastic rounding counts elements of the whole parameter)."""
    shape, block, cuts = (70, 45), (16, 16), (0, 21, 35, 70)  # shards start 5 and 3 rows into a block row
    gen = torch.Generator().manual_seed(2)
    mask = random_block_mask(shape, 0.3, block, generator=gen)
    whole = {"masked": apply_block_mask_(torch.randn(shape, generator=gen), mask, block).to(dtype).to(device),
             "dense": torch.randn(shape, generator=gen).to(dtype).to(device)}
    masks = {"masked": mask.to(device), "dense": None}
    shards = {k: [whole[k].clone()[a:b] for a, b in zip(cuts, cuts[1:])] for k in whole}

    def state(p, layout):
        return new_state(p, layout, torch.float32), new_state(p, layout, torch.float32)

    layouts = {k: BlockLayout.for_param(whole[k], block, masks[k]) for k in whole}
    states = {k: state(whole[k], layouts[k]) for k in whole}
    shard_layouts = {k: [BlockLayout.for_param(p, block, masks[k], a) for p, a in zip(shards[k], cuts)]
                     for k in whole}
    shard_states = {k: [state(p, lay) for p, lay in zip(shards[k], shard_layouts[k])] for k in whole}
    for step in range(1, 4):
        grads = {k: torch.randn(shape, generator=gen).to(dtype).to(device) for k in whole}
        seed = 1000 + step if dtype == torch.bfloat16 else None

        def update(p, g, m_v, layout):
            return ParamUpdate(p, g, *m_v, layout, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, seed)

        ext_impl.step([update(whole[k], grads[k], states[k], layouts[k]) for k in whole], {})
        ext_impl.step([update(p, grads[k][a:b], m_v, lay) for k in whole
                       for p, a, b, m_v, lay in zip(shards[k], cuts, cuts[1:], shard_states[k], shard_layouts[k])],
                      {})
    for k in whole:
        assert torch.equal(torch.cat(shards[k]), whole[k]), k
        for i in range(2):
            dense = [compact_to_dense(m_v[i], lay.mask, p.shape, block, lay.row_shift)
                     for p, m_v, lay in zip(shards[k], shard_states[k], shard_layouts[k])]
            expected = compact_to_dense(states[k][i], layouts[k].mask, shape, block)
            assert torch.equal(torch.cat(dense), expected), (k, i)


@pytest.mark.parametrize("message", list(BAD_CALLS))
def test_binding_checks_every_input(message):
    ext = build.extension(cuda=False)
    args = _call_args()
    ext.step(**args)  # valid as it is
    BAD_CALLS[message](args)
    with pytest.raises(RuntimeError, match=message):
        ext.step(**args)


@pytest.mark.gpu
def test_binding_checks_devices():
    ext = build.extension(cuda=True)
    args = _call_args("cuda")
    ext.step(**args)
    args["grads"][1] = torch.zeros(40, 48)
    with pytest.raises(RuntimeError, match="grads\\[1\\] is on cpu"):
        ext.step(**args)
    args = _call_args("cuda")
    args["block_ids"] = args["block_ids"].cpu()
    with pytest.raises(RuntimeError, match="int32 tensors on cuda"):
        ext.step(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_blocks_of_a_large_batch_stay_untouched(device):
    """Many params in one call, NaN gradients in pruned blocks: pruned params and grads are bitwise as they were."""
    impl = "cuda" if device == "cuda" else "cpp"
    _skip_unrunnable(impl, device)
    shapes = [(130, 77), (64, 64), (16, 300)] * 4
    params = [torch.randn(s, device=device) for s in shapes]
    masks = {p: random_block_mask(p.shape, 0.5, device=device) for p in params}
    for p, m in masks.items():
        apply_block_mask_(p, m)
    opt = _optimizer(params, masks, impl=impl)
    for p in params:
        live = expand_block_mask(masks[p], p.shape)
        p.grad = torch.where(live, torch.randn_like(p), torch.full_like(p, float("nan")))
    opt.step()
    for p in params:
        pruned = ~expand_block_mask(masks[p], p.shape)
        assert torch.equal(p[pruned], torch.zeros(int(pruned.sum()), device=device))
        assert p[~pruned].isfinite().all()
