"""How the compiled extension is built: sources and flags shared by setup.py and the JIT build, and the JIT build.

`sparse_adamw._C` is built by `pip install` where torch is importable at build time (`--no-build-isolation`),
with the CUDA kernel where torch is a CUDA build and nvcc is found. Where it was not (pip's isolated build
environment has no torch, and pulling torch into it would download gigabytes), `extension()` compiles the same
sources with `torch.utils.cpp_extension.load` on first use, says so on the `sparse_adamw` logger, and caches the
result: later processes load it in about a second. `python -m sparse_adamw.backends.build [--cuda]` does that
ahead of time. Importing this module compiles nothing; setup.py loads it by path, before torch may exist, so only
the standard library is imported at module level.

Environment:
    SPARSE_ADAMW_SKIP_BUILD=1       setup.py builds no extension (the JIT build compiles it on first use)
    SPARSE_ADAMW_SKIP_CUDA_BUILD=1  setup.py builds the CPU kernel only
    SPARSE_ADAMW_CUDA_ARCHS         CUDA architectures, e.g. "80;90" (setup.py's default) or "90a"; the JIT build's
                                    default is torch's (TORCH_CUDA_ARCH_LIST, else the visible GPUs)
    SPARSE_ADAMW_BUILD_DIR          root of the JIT build cache (default: torch's extensions directory,
                                    TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions); one folder per Python,
                                    torch and digest of the sources
    MAX_JOBS                        parallel compile jobs (torch.utils.cpp_extension)
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

logger = logging.getLogger("sparse_adamw")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/sparse_adamw_cpu.cpp"]
CUDA_SOURCES = ["csrc/sparse_adamw_cuda.cu"]
SETUP_CUDA_ARCHS = "80;90"
STALE_LOCK_S = 900  # a build lock older than this was left by a killed build (a CUDA build takes minutes)
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources(cuda: bool) -> List[str]:
    """Source files, relative to the repository root."""
    return CPU_SOURCES + (CUDA_SOURCES if cuda else [])


def cxx_flags(cuda: bool) -> List[str]:
    # No contraction into FMA: the update must round as the reference does (csrc/sparse_adamw.h). No errno or traps
    # (as torch's own build): otherwise sqrtf keeps a branch that stops the loops from vectorising. OpenMP:
    # at::parallel_for is a header template that runs serially without it; the library is torch's own libgomp.
    return (["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", *_OPENMP]
            + (["-DSPARSE_ADAMW_WITH_CUDA"] if cuda else []))


def ld_flags() -> List[str]:
    # libstdc++ by name, shared: some toolchains (seen: a g++ wrapper on the GPU machine's image) link it statically
    # by default, and a second, static libstdc++ inside the extension crashed formatting a number into an error
    # message (its locale is not the process's). Named among our flags, it comes before the driver's own libraries,
    # so the shared library resolves every symbol.
    return (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []) + list(_OPENMP)


def nvcc_flags(archs: Optional[str]) -> List[str]:
    """`archs` as in SPARSE_ADAMW_CUDA_ARCHS; None leaves the choice to torch."""
    # No FMA contraction, as for the CPU; the architectures compile in parallel.
    flags = ["-O3", "--fmad=false", "--threads=0", "-DSPARSE_ADAMW_WITH_CUDA"]
    if archs:
        codes = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
        flags += [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
        # PTX of the newest, so that later GPUs can still run it.
        flags.append(f"-gencode=arch=compute_{codes[-1]},code=compute_{codes[-1]}")
    return flags


# ------------------------------------------------------------------------------------------------ the JIT build
_modules: Dict[bool, object] = {}


def _jit_name(cuda: bool) -> str:
    return "sparse_adamw_C_cuda" if cuda else "sparse_adamw_C_cpu"


def _sources_digest(cuda: bool) -> str:
    """A digest of what the binary is built from: the sources, the headers and the flags."""
    csrc = os.path.join(ROOT, "csrc")
    files = sorted(set(sources(cuda) + [os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".h")]))
    digest = hashlib.sha1(repr((cxx_flags(cuda), ld_flags(), nvcc_flags(os.environ.get("SPARSE_ADAMW_CUDA_ARCHS"))
                                if cuda else None)).encode())
    for name in files:
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


def jit_build_dir(cuda: bool) -> str:
    """Where the JIT build of the extension lives: per Python and torch version, as the binary depends on both, and
    per digest of its sources, so that checkouts of different versions never build over each other."""
    import torch
    from torch.utils import cpp_extension

    root = (os.environ.get("SPARSE_ADAMW_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or cpp_extension.get_default_build_root())
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return os.path.join(root, tag, f"{_jit_name(cuda)}_{_sources_digest(cuda)}")


def _jit_library(cuda: bool) -> str:
    return os.path.join(jit_build_dir(cuda), _jit_name(cuda) + ".so")


def _jit_is_fresh(cuda: bool) -> bool:
    """A JIT build of these very sources exists (its folder is named by their digest)."""
    return os.path.exists(_jit_library(cuda))


def clear_stale_lock(build_dir: str, stale_after_s: float = STALE_LOCK_S) -> None:
    """torch's build lock is a file that a killed build leaves behind, and every later build waits for it forever.
    Remove it when it is older than any build takes; otherwise say what is being waited for."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return  # no lock
    if age > stale_after_s:
        logger.warning("sparse_adamw: removing the stale build lock %s (%.0f s old: its build was killed)", lock, age)
        try:
            os.remove(lock)
        except FileNotFoundError:
            pass
    else:
        logger.warning("sparse_adamw: waiting for another process's build of the extension (lock %s, %.0f s old; "
                       "delete it if no build is running)", lock, age)


def _installed(cuda: bool):
    """sparse_adamw._C when it was built at install time (with the CUDA kernel if `cuda`), else None."""
    try:
        _C = importlib.import_module("sparse_adamw._C")
    except ModuleNotFoundError as exc:
        if exc.name != "sparse_adamw._C":
            raise
        return None
    except ImportError as exc:  # e.g. built against another torch
        logger.warning("sparse_adamw._C is installed but does not import (%s); using a JIT build instead", exc)
        return None
    return _C if _C.with_cuda or not cuda else None


def is_built(cuda: bool) -> bool:
    """Whether `extension(cuda)` returns without compiling (loaded, installed, or a fresh JIT build)."""
    return cuda in _modules or _installed(cuda) is not None or _jit_is_fresh(cuda)


def extension(cuda: bool):
    """The compiled module with the CPU kernel (and the CUDA kernel if `cuda`): sparse_adamw._C, else a JIT build."""
    if cuda not in _modules:
        _modules[cuda] = _installed(cuda) or _jit_build(cuda)
    return _modules[cuda]


def _jit_build(cuda: bool):
    from torch.utils import cpp_extension

    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        raise RuntimeError(f"sparse_adamw._C is not installed and its sources are not at {ROOT}/csrc (a wheel "
                           "installed without torch at build time); reinstall from a source checkout with torch "
                           "present: pip install --no-build-isolation .")
    if shutil.which("ninja") is None:
        try:  # the `ninja` wheel's binary sits in the venv's bin, which is not on PATH without activation
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # cpp_extension then says that ninja is needed
    build_dir = jit_build_dir(cuda)
    os.makedirs(build_dir, exist_ok=True)
    clear_stale_lock(build_dir)
    fresh = _jit_is_fresh(cuda)
    if fresh and not os.path.exists(os.path.join(build_dir, "lock")):
        # Built and no build running: import the library itself. cpp_extension.load would run ninja under a file
        # lock in every process, and the processes of a distributed run all start at once.
        return _import_library(cuda)
    if not fresh:
        logger.warning("sparse_adamw: compiling the C++%s extension into %s (once; about %s; "
                       "SPARSE_ADAMW_IMPL=torch does without it) ...", "/CUDA" if cuda else "", build_dir,
                       "a few minutes" if cuda else "a minute on 2 cores")
    start = time.perf_counter()
    module = cpp_extension.load(
        _jit_name(cuda),
        [os.path.join(ROOT, s) for s in sources(cuda)],
        extra_cflags=cxx_flags(cuda),
        extra_cuda_cflags=nvcc_flags(os.environ.get("SPARSE_ADAMW_CUDA_ARCHS")) if cuda else None,
        extra_ldflags=ld_flags(),
        build_directory=build_dir,
        with_cuda=cuda,
    )
    if not fresh:
        logger.warning("sparse_adamw: compiled the extension in %.0f s", time.perf_counter() - start)
    return module


def _import_library(cuda: bool):
    spec = importlib.util.spec_from_file_location(_jit_name(cuda), _jit_library(cuda))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Compile sparse_adamw's C++ (and CUDA) extension ahead of use.")
    parser.add_argument("--cuda", action="store_true", help="include the CUDA kernel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = extension(args.cuda)
    print(f"{module.__name__}: {module.__file__}")


if __name__ == "__main__":
    main()
