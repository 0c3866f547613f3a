"""Backend selection. Every backend takes the same list of `ParamUpdate`s and updates them in place.

Backends: "torch" (vectorised PyTorch, any device), "triton" (CUDA; CPU tensors only under TRITON_INTERPRET=1),
"cuda" (the compiled CUDA kernel) and "cpp" (the compiled CPU kernel); the last two share the extension
sparse_adamw._C (`build` says how it is built).

Order of choice: the optimizer's `impl` argument, then the SPARSE_ADAMW_IMPL environment variable (which only
overrides "auto"), then automatic: the first backend in AUTO_ORDER for the parameters' device that loads, quietly
falling back to the next. An explicit request for one that cannot load raises BackendUnavailable, carrying the
original import or compile error as its message and __cause__.

"auto" never compiles: it takes "cpp" or "cuda" only when the extension is already built (installed with torch
present, or in the JIT cache), since the first JIT build takes about a minute on 2 CPU cores (more with CUDA),
more than it saves in a short CPU run. impl="cpp", SPARSE_ADAMW_IMPL=cpp or
`python -m sparse_adamw.backends.build` builds it once; from then on "auto" picks it.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, NamedTuple, Optional

import torch

from ..layout import BlockLayout

IMPLS = ("auto", "torch", "triton", "cuda", "cpp")
# Fastest first, per device type. On CPU, cpp is several times faster than torch (benchmarks/RESULTS_cpu_step.md).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_COMPILED = ("cuda", "cpp")


class ParamUpdate(NamedTuple):
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    layout: BlockLayout
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    rounding_seed: Optional[int]  # None: round to nearest; else stochastic rounding of bf16 params, this seed


class BackendUnavailable(RuntimeError):
    pass


_MODULES = {
    "torch": "sparse_adamw.backends.torch_impl",
    "triton": "sparse_adamw.triton_kernels.sparse_adamw",
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


def _built_for_auto(name: str) -> bool:
    """False for a compiled backend whose extension would have to be compiled first (auto does not do that)."""
    if name not in _COMPILED or name in _loaded:
        return True
    from . import build

    return build.is_built(cuda=name == "cuda")


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
        if _supports(name, device) is None and _built_for_auto(name):
            try:
                return load_backend(name)
            except BackendUnavailable as exc:
                errors.append(str(exc))
    raise BackendUnavailable(f"no sparse_adamw backend for {device}: " + "; ".join(errors))
