"""Backend selection. Every backend takes a list of `ParamUpdate`s (`common`) and updates them in place.

A backend module has `step(updates, cache, launch, grad_scale)` (grad_scale: None, or a one-element tensor that
multiplies every gradient, which is how SparseAdamW.clip_grad_norm_ clips), a `DTYPES` tuple, optionally
`load(name)` (run when it is selected), `PreparedStep` (the optimizer's fast path, where the backend can keep a
launch from one step to the next) and `square_sum(grads, layouts, cache, launch)` (the live blocks' sum of squares,
for clipping; the torch backend's serves the others).

Backends: "torch" (vectorised PyTorch, any device), "triton" (CUDA; CPU tensors only under TRITON_INTERPRET=1),
"cuda" (the compiled CUDA kernel) and "cpp" (the compiled CPU kernel); the last two share the extension
sparse_adamw._C (`build` says how it is built).

Order of choice: the optimizer's `impl` argument, then the SPARSE_ADAMW_IMPL environment variable (which only
overrides "auto"), then automatic: the first backend in AUTO_ORDER for the parameters' device that loads, falling
back to the next quietly (with a warning after a failed build). An explicit request for one that cannot load
raises BackendUnavailable, carrying the original import or compile error as its message and __cause__.

On the CPU, "auto" compiles the C++ extension when it is not built yet: once per machine (cached), about a minute
on 2 cores, announced on stderr (the `sparse_adamw` logger) before it starts. It pays for itself within a few
steps: on the 135M default model the torch backend takes seconds per step and cpp about 0.15 s
(benchmarks/RESULTS_cpu_step.md). SPARSE_ADAMW_IMPL=torch skips it; a failed build falls back to torch with a
warning and is not retried. On the GPU, "auto" takes "cuda" only when that extension is already built (installed,
or in the JIT cache): its build takes minutes, and Triton comes first anyway.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, List, Optional

import torch

from .common import LaunchConfig, ParamUpdate  # noqa: F401 (what callers of the backends use)

logger = logging.getLogger("sparse_adamw")

IMPLS = ("auto", "torch", "triton", "cuda", "cpp")
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_COMPILED = ("cuda", "cpp")


class BackendUnavailable(RuntimeError):
    pass


_MODULES = {
    "torch": "sparse_adamw.backends.torch_impl",
    "triton": "sparse_adamw.backends.triton_impl",
    "cuda": "sparse_adamw.backends.ext_impl",
    "cpp": "sparse_adamw.backends.ext_impl",
}
_loaded: Dict[str, object] = {}
_failed: Dict[str, Exception] = {}  # a failed compile is not retried at every step


def load_backend(name: str):
    """Import a backend module and run its `load` hook, if any (cached); raise BackendUnavailable with the original
    error as its cause."""
    if name not in _loaded:
        if name not in _failed:
            try:
                module = importlib.import_module(_MODULES[name])
                if hasattr(module, "load"):
                    module.load(name)
                _loaded[name] = module
            except Exception as exc:  # an ImportError, or a compile error in an extension
                _failed[name] = exc
        if name in _failed:
            exc = _failed[name]
            raise BackendUnavailable(f"sparse_adamw backend {name!r} is not available: {exc}") from exc
    return _loaded[name]


def requested_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get("SPARSE_ADAMW_IMPL", "auto").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"SPARSE_ADAMW_IMPL must be one of {IMPLS}, got {env!r}")
        return env
    return impl


def _supports(name: str, device: torch.device) -> Optional[str]:
    """None if backend `name` can run on `device`, else the reason it cannot."""
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if name == "triton" and device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return "the CUDA kernel updates CUDA tensors only (impl='cpp' is its CPU twin)"
    if name == "cpp" and device.type != "cpu":
        return "the C++ kernel updates CPU tensors only (impl='cuda' is its GPU twin)"
    return None


def _auto_may_load(name: str) -> bool:
    """False for the CUDA extension while it is not built: "auto" compiles only the CPU one."""
    if name != "cuda" or name in _loaded:
        return True
    from . import build

    return build.is_built(cuda=True)


def select_backend(impl: str, device: torch.device):
    """The backend module for `impl` ("auto" resolved) on `device`."""
    impl = requested_impl(impl)
    if impl != "auto":
        reason = _supports(impl, device)
        if reason:
            raise BackendUnavailable(f"sparse_adamw backend {impl!r} cannot update {device} tensors: {reason}")
        return load_backend(impl)
    errors: List[str] = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if _supports(name, device) is None and _auto_may_load(name):
            first_try = name not in _failed
            try:
                return load_backend(name)
            except BackendUnavailable as exc:
                errors.append(str(exc))
                if name in _COMPILED and first_try:  # the user may have waited for that build: say why it failed
                    logger.warning("%s; using the next backend", exc)
    raise BackendUnavailable(f"no sparse_adamw backend for {device}: " + "; ".join(errors))
