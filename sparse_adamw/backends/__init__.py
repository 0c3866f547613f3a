"""Backend selection. Every backend takes the same list of `ParamUpdate`s and updates them in place.

Order of choice: the optimizer's `impl` argument, then the SPARSE_ADAMW_IMPL environment variable (which only
overrides "auto"), then automatic: the fastest backend that loads for the parameters' device. Automatic
quietly falls back to the next backend; an explicit request for one that cannot load raises, carrying the
original error.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, NamedTuple, Optional

import torch

from ..layout import BlockLayout

IMPLS = ("auto", "torch", "triton")
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


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
}
_loaded: Dict[str, object] = {}


def load_backend(name: str):
    """Import a backend module (cached); raise BackendUnavailable with the original error as its cause."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an ImportError, or a compile error in an extension
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
    return None


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
        if _supports(name, device) is None:
            try:
                return load_backend(name)
            except BackendUnavailable as exc:
                errors.append(str(exc))
    raise BackendUnavailable(f"no sparse_adamw backend for {device}: " + "; ".join(errors))
