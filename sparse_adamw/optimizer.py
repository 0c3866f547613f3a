"""SparseAdamW: a drop-in torch.optim.Optimizer that updates only the live blocks of block-pruned weights."""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Union

import torch

from . import full_state
from .dtensor import full_tensor, is_dtensor, local_tensor, row_offset, sharded_mesh_dims
from .backends import LaunchConfig, ParamUpdate, load_backend, requested_impl, select_backend
from .fast_path import FastPlan, Planned
from .layout import BlockLayout, compact_to_dense, new_state
from .masks import BlockSize, block_grid, block_mask_from_zeros, leaked_blocks, normalize_block_size

logger = logging.getLogger("sparse_adamw")

_STATE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW's convention) restricted to live blocks.

    Args:
        params: tensors or param-group dicts, as for any torch optimizer.
        lr, betas, eps, weight_decay: as torch.optim.AdamW; per group as usual.
        masks: None (every parameter dense), a dict {param: bool block mask, True = live}, or "auto": every 2-D
            parameter with at least one all-zero block gets the mask of its nonzero blocks.
        block_size: int or (bh, bw); a mask of a (R, C) parameter has shape (ceil(R/bh), ceil(C/bw)).
        impl: "auto", "triton", "cuda", "cpp" or "torch" (sparse_adamw.backends says how "auto" chooses); "auto"
            honours the SPARSE_ADAMW_IMPL environment variable.
        state_dtype: dtype of exp_avg / exp_avg_sq: torch.float32 (default) or torch.bfloat16.
        stochastic_rounding: round updated bf16 params and a bf16 exp_avg_sq up with probability equal to the
            dropped fraction, so that updates smaller than half a bf16 ulp are kept in expectation (rounded to
            nearest, a bf16 exp_avg_sq could never decrease with beta2 = 0.999). None (default) = on.
            float16 params and exp_avg always round to nearest.
        seed: seeds the rounding's counter-based random bits (per parameter and step): runs are reproducible.
        launch: how the fused kernels split the work (`sparse_adamw.backends.LaunchConfig`); the default is the
            measured best, so this is for tuning and tests.

    Pruned blocks are never read or written: they stay bitwise as they are whatever their gradient holds, and
    they have no optimizer state (see `sparse_adamw.layout` for the compact state format).

    Clipping: `clip_grad_norm_(max_norm)` in place of torch.nn.utils.clip_grad_norm_ measures the live blocks' norm
    and has the next step() scale the gradients as it reads them, with no pass that rewrites them.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        masks: Union[None, str, Dict[torch.Tensor, torch.Tensor]] = None,
        block_size: BlockSize = 16,
        impl: str = "auto",
        state_dtype: Union[None, str, torch.dtype] = None,
        stochastic_rounding: Optional[bool] = None,
        seed: int = 0,
        launch: Optional[LaunchConfig] = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        block_size=normalize_block_size(block_size), stochastic_rounding=stochastic_rounding,
                        seed=int(seed))
        requested_impl(impl)  # validate early
        self.impl = impl
        self._launch = launch or LaunchConfig()
        self.state_dtype = _state_dtype(state_dtype)
        self._layouts: Dict[torch.Tensor, BlockLayout] = {}
        self._entries: Dict[int, tuple] = {}  # id(p) -> (p, layout, state, is DTensor): step()'s per-tensor facts
        self._kernel_cache: Dict = {}
        self._backends: Dict = {}
        self._fast: Optional[FastPlan] = None  # step()'s fast path (sparse_adamw.fast_path)
        self._grad_scale: Optional[torch.Tensor] = None  # clip_grad_norm_'s coefficient, for the next step()
        super().__init__(params, defaults)
        if masks is not None:
            self._set_masks(masks)

    # ----------------------------------------------------------------------------------------------- validation
    def add_param_group(self, param_group):
        if isinstance(param_group, dict) and "block_size" in param_group:
            param_group["block_size"] = normalize_block_size(param_group["block_size"])
        super().add_param_group(param_group)
        self._fast = None
        group = self.param_groups[-1]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        for i, beta in enumerate((beta1, beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta at index {i}: {beta} (must be in [0, 1))")
        if not wd >= 0.0:
            raise ValueError(f"Invalid weight_decay: {wd} (must be >= 0)")
        for p in group["params"]:
            what = self._describe(p)
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"SparseAdamW does not support sparse tensors: {what}")
            if p.is_complex():
                raise ValueError(f"SparseAdamW does not support complex tensors: {what}")
            if p.dtype not in _PARAM_DTYPES:
                raise ValueError(f"SparseAdamW supports float32/bfloat16/float16/float64 params: {what} is {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"SparseAdamW needs contiguous params: {what} is not")

    def _describe(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(getattr(self, "param_groups", [])):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    name = repr(names[pi]) if names else f"#{pi}"
                    return f"parameter {name} of group {gi} (shape {tuple(p.shape)}, {p.dtype})"
        return f"parameter of shape {tuple(p.shape)} ({p.dtype})"

    def _group_of(self, p: torch.Tensor):
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        return None

    def _set_masks(self, masks, check: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, "_is_flat_param", False):
                    raise ValueError(
                        f"{self._describe(p)} is an FSDP1 flat parameter: flattening destroys the 2-D block "
                        "structure that block masks describe. Shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
                        "or accelerate's fsdp_version: 2), which keeps each parameter's rows together.")
        if isinstance(masks, str):
            if masks != "auto":
                raise ValueError(f'masks must be None, "auto" or a dict {{param: block mask}}, got {masks!r}')
            self._auto_masks()
            return
        if not isinstance(masks, dict):
            raise TypeError(f'masks must be None, "auto" or a dict {{param: block mask}}, got {type(masks).__name__}')
        for p, mask in masks.items():
            group = self._group_of(p) if isinstance(p, torch.Tensor) else None
            if group is None:
                what = f"tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else repr(p)
                raise ValueError(f"masks has a key that is not among the optimizer's parameters: {what}")
            self._check_mask(p, mask, group["block_size"])
            leaked = int(leaked_blocks(p, mask, group["block_size"]).sum()) if check else 0
            if leaked:
                logger.warning("%s has nonzeros in %d blocks its mask marks pruned; SparseAdamW leaves them as they "
                               "are (sparse_adamw.masks.apply_block_mask_ zeros them)", self._describe(p), leaked)
            self.state[p]["block_mask"] = mask

    def set_masks(self, masks: Union[str, Dict[torch.Tensor, torch.Tensor]], *, check: bool = True) -> None:
        """Give parameters block masks after construction: `"auto"` or `{param: mask}`, as the `masks` argument.

        Only before a parameter's first step (its moments are laid out by its mask). Meant for wrappers that swap
        the optimizer's parameters after it is built, as accelerate's FSDP2 preparation does: set the masks on
        the parameters that are there now. A DTensor (FSDP2) parameter takes the mask of the whole parameter;
        every rank must call this with the same masks (each rank compares them with the zeros of its own rows).

        `check=False` skips that comparison of each given mask with its parameter's zeros (a pass over the
        weights), for callers that derived the masks from these weights or verified them already.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if "exp_avg" in self.state.get(p, {}):
                    raise RuntimeError(f"set_masks after {self._describe(p)} has taken a step: its state is laid "
                                       "out already; set masks before the first step")
        self._set_masks(masks, check)
        self._forget_layouts()

    def _check_mask(self, p: torch.Tensor, mask, block) -> None:
        what = self._describe(p)
        if p.dim() != 2:
            raise ValueError(f"{what} has {p.dim()} dims; block masks are for 2-D parameters")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the mask of {what} must be a torch.bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"the mask of {what} must be torch.bool (True = live block), got {mask.dtype}")
        expected = block_grid(p.shape, block)
        if tuple(mask.shape) != expected:
            raise ValueError(f"the mask of {what} has shape {tuple(mask.shape)}; blocks of {block[0]}x{block[1]} "
                             f"need {expected}")
        if mask.device != p.device:
            raise ValueError(f"the mask of {what} is on {mask.device}, the parameter on {p.device}")

    @torch.no_grad()
    def _auto_masks(self) -> None:
        n_params = n_masked = n_blocks = n_pruned = 0
        for group in self.param_groups:
            for p in group["params"]:
                n_params += 1
                if p.dim() != 2:
                    continue
                mask = block_mask_from_zeros(full_tensor(p), group["block_size"])
                if not mask.all():
                    self.state[p]["block_mask"] = mask
                    n_masked += 1
                    n_blocks += mask.numel()
                    n_pruned += int((~mask).sum())
        bh, bw = self.defaults["block_size"]
        logger.info("SparseAdamW: masks for %d of %d parameters (2-D, with all-zero %dx%d blocks); %.2f%% of their "
                    "blocks pruned", n_masked, n_params, bh, bw, 100.0 * n_pruned / max(n_blocks, 1))

    # ------------------------------------------------------------------------------------------------ the step
    def _layout(self, p: torch.Tensor, group) -> BlockLayout:
        layout = self._layouts.get(p)
        if layout is None:
            layout = BlockLayout.for_param(local_tensor(p), group["block_size"], self.state[p].get("block_mask"),
                                           row_offset(p, self._describe(p)))
            self._layouts[p] = layout
        return layout

    def _forget_layouts(self) -> None:
        """After masks or state change: layouts, step()'s per-tensor facts and the backends' launch plans."""
        self._layouts.clear()
        self._entries.clear()
        self._kernel_cache.clear()
        self._fast = None

    def _entry(self, p: torch.Tensor, group) -> tuple:
        """step()'s facts about p that do not change between steps; creates p's state on its first step."""
        layout = self._layout(p, group)
        state = self.state[p]
        if "exp_avg" not in state:
            local = local_tensor(p)
            state["step"] = 0
            state["exp_avg"] = new_state(local, layout, self.state_dtype)
            state["exp_avg_sq"] = new_state(local, layout, self.state_dtype)
        entry = self._entries[id(p)] = (p, layout, state, is_dtensor(p))
        return entry

    def _backend(self, device: torch.device, dtypes):
        key = (device, dtypes)
        if key not in self._backends:
            backend = select_backend(self.impl, device)
            if not set(dtypes) <= set(backend.DTYPES):
                if requested_impl(self.impl) != "auto":
                    raise TypeError(f"sparse_adamw backend {self.impl!r} does not support {dtypes}")
                backend = select_backend("torch", device)  # e.g. float64 params
            self._backends[key] = backend
        return self._backends[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, self._grad_scale = self._grad_scale, None
        if self._fast_step(grad_scale):
            return loss
        self._fast = None
        # The general path: every check and every fact per tensor, in Python. When every update of this step
        # qualifies, FastPlan makes the next ones cheap (sparse_adamw.fast_path).
        batches: Dict[tuple, List[Planned]] = {}
        entries = self._entries
        position = -1
        for group_number, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay, seed = float(group["lr"]), group["eps"], group["weight_decay"], group["seed"]
            stochastic = group["stochastic_rounding"] is not False
            for p in group["params"]:
                position += 1
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"SparseAdamW does not support sparse gradients: {self._describe(p)}")
                if grad.shape != p.shape:
                    raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for {self._describe(p)}")
                entry = entries.get(id(p))
                if entry is None or entry[0] is not p:
                    entry = self._entry(p, group)
                _, layout, state, sharded = entry
                if sharded:  # FSDP2: this rank's rows
                    p, grad = local_tensor(p), local_tensor(grad)
                qualifies = not sharded and grad.is_contiguous()
                grad = grad.contiguous()
                step = state["step"] = state["step"] + 1
                exp_avg = state["exp_avg"]
                update = ParamUpdate(p, grad, exp_avg, state["exp_avg_sq"], layout, step, lr, beta1, beta2, eps,
                                     weight_decay, seed if stochastic else None, position)
                key = (p.device, p.dtype, grad.dtype, exp_avg.dtype, layout.block, stochastic)
                batches.setdefault(key, []).append(Planned(update, group_number, position, qualifies))
        for key, planned in batches.items():
            self._batch_backend(key).step([item.update for item in planned], self._kernel_cache, self.launch,
                                          None if grad_scale is None else grad_scale.to(key[0]))
        self._fast = self._prepare_fast(batches)
        return loss

    @property
    def launch(self) -> LaunchConfig:
        """How the fused kernels split the work; a new one takes effect at the next step."""
        return self._launch

    @launch.setter
    def launch(self, launch: LaunchConfig) -> None:
        self._launch = launch
        self._fast = None  # its launches were prepared with the old one

    def _fast_step(self, grad_scale) -> bool:
        return self._fast is not None and self._fast.step(self.param_groups, grad_scale)

    def _prepare_fast(self, batches) -> Optional[FastPlan]:
        return FastPlan.prepare(self.param_groups, self.state, batches, self._batch_backend, self._kernel_cache,
                                self.launch)

    def _batch_backend(self, key: tuple):
        """The backend of a batch of step(), keyed (device, param, grad and state dtypes, block, rounding)."""
        return self._backend(key[0], tuple(key[1:4]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = None  # a pending clip_grad_norm_ was measured on these gradients
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------------------------------------ clipping
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The L2 norm (fp32, on the first gradient's device) of the live blocks of the parameters' gradients; a
        parameter without a mask counts whole.

        What torch.nn.utils.clip_grad_norm_ measures, less the pruned blocks: step() never reads them, so NaN or inf
        there does not count. One read of the live blocks, one launch per batch of gradients on the Triton backend.
        DDP: call it once the gradients are reduced. FSDP2 (DTensor gradients): each rank sums its rows and one
        all-reduce per mesh dimension joins them, so every rank must call it, with the same parameters holding
        gradients.
        """
        batches: Dict[tuple, tuple] = {}  # (device, dtype, block, sharding) -> (local gradients, their layouts)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                local = local_tensor(p.grad).contiguous()
                key = (local.device, local.dtype, group["block_size"], sharded_mesh_dims(p.grad))
                grads, layouts = batches.setdefault(key, ([], []))
                grads.append(local)
                layouts.append(self._layout(p, group))
        if not batches:
            return torch.zeros(())
        device = next(iter(batches))[0]
        total = torch.zeros((), dtype=torch.float32, device=device)
        sharded: Dict[tuple, torch.Tensor] = {}  # (mesh, dims) -> partial sum: one all-reduce per mesh dimension
        for (batch_device, dtype, _, sharding), (grads, layouts) in batches.items():
            backend = self._backend(batch_device, (dtype,))
            square_sum = getattr(backend, "square_sum", None) or load_backend("torch").square_sum
            square = square_sum(grads, layouts, self._kernel_cache, self.launch).to(device)
            if sharding is None:
                total += square
            else:
                sharded[sharding] = sharded[sharding] + square if sharding in sharded else square
        for (mesh, dims), partial in sharded.items():
            for dim in dims:
                torch.distributed.all_reduce(partial, group=mesh.get_group(dim))
            total += partial
        return total.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_(params, max_norm) over the live blocks, fused into the next step.

        Measures `grad_norm()` and returns it (before clipping, as torch does); the next step() then multiplies
        every gradient by torch's coefficient min(1, max_norm / (norm + 1e-6)) as it reads it. Nothing else
        touches the gradients: p.grad keeps the unclipped values, and no pass rewrites them (the Triton backend
        scales inside its kernel; the others scale the gradients in place just before their update). zero_grad()
        drops a pending coefficient, a later clip_grad_norm_ replaces it, and max_norm=inf only measures. The
        coefficient stays on the device: no host synchronisation.
        """
        norm = self.grad_norm()
        max_norm = float(max_norm)
        self._grad_scale = None if math.isinf(max_norm) else (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return norm

    # ----------------------------------------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict) -> None:
        self._check_loaded_masks(state_dict)
        # torch casts every floating state tensor to the param's dtype (and masks too); ours keep their dtype.
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, copy=True)
                self._check_loaded_state(p, group)
        self._forget_layouts()

    def _check_loaded_masks(self, state_dict) -> None:
        """Before anything is replaced: each loaded mask fits its parameter, whose pruned blocks must be zero. Masks
        saved for other weights (another model, another prune) would let those blocks train."""
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                mask = state_dict["state"].get(index, {}).get("block_mask")
                if mask is None:
                    continue
                mask = mask.to(p.device)
                self._check_mask(p, mask, group["block_size"])
                held = self.state.get(p, {}).get("block_mask")
                if held is not None and torch.equal(held, mask):
                    continue  # the mask it holds already (accelerate round-trips the state to place it)
                leaked = int(leaked_blocks(p, mask, group["block_size"]).sum())
                if leaked:
                    raise ValueError(
                        f"the loaded block mask of {self._describe(p)} marks {leaked} blocks pruned that hold "
                        "nonzeros in the parameter: that state was saved for other weights (another model or another "
                        "prune). Load the weights it belongs to first, or start the optimizer afresh")

    def _check_loaded_state(self, p: torch.Tensor, group) -> None:
        state = self.state.get(p, {})  # not self.state[p]: that would add an entry for a parameter without state
        if "block_mask" in state:
            self._check_mask(p, state["block_mask"], group["block_size"])
        if "exp_avg" in state:
            layout = BlockLayout.for_param(local_tensor(p), group["block_size"], state.get("block_mask"),
                                           row_offset(p, self._describe(p)))
            expected = tuple(local_tensor(p).shape) if layout.mask is None else layout.state_shape
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(state[key].shape) != expected:
                    raise ValueError(f"loaded {key} of shape {tuple(state[key].shape)} does not fit "
                                     f"{self._describe(p)}: expected {expected}")

    # ------------------------------------------------------------------------------- whole-parameter state I/O
    def full_state_dict(self, *, to_cpu: bool = True, rank0_only: bool = False) -> Dict[str, object]:
        """The state dict a single-process SparseAdamW over the whole parameters would have (FSDP2: every rank
        calls it). `sparse_adamw.full_state.full_state_dict` documents the format and the arguments."""
        return full_state.full_state_dict(self, to_cpu=to_cpu, rank0_only=rank0_only)

    def load_full_state_dict(self, state_dict) -> None:
        """Load `full_state_dict()`'s format (also a single-process `state_dict()`) into these parameters, which
        may be FSDP2 row shards: each rank keeps its own rows (`sparse_adamw.full_state.load_full_state_dict`)."""
        full_state.load_full_state_dict(self, state_dict)

    def dense_state(self, p: torch.Tensor) -> Dict[str, object]:
        """Param-shaped copies of p's state ({"step", "exp_avg", "exp_avg_sq"}; pruned blocks read as 0).

        For an FSDP2 parameter: this rank's rows.
        """
        state = self.state[p]
        if "exp_avg" not in state:
            return {}
        layout = self._layout(p, self._group_of(p))
        shape = local_tensor(p).shape
        return {"step": state["step"],
                **{k: compact_to_dense(state[k], layout.mask, shape, layout.block, layout.row_shift)
                   for k in ("exp_avg", "exp_avg_sq")}}

    def state_bytes(self) -> int:
        """Bytes held in exp_avg and exp_avg_sq over all parameters."""
        return sum(s[k].numel() * s[k].element_size() for s in self.state.values()
                   for k in ("exp_avg", "exp_avg_sq") if k in s)


def _state_dtype(state_dtype) -> torch.dtype:
    if state_dtype is None:
        return torch.float32
    if isinstance(state_dtype, str):
        if state_dtype.lower() not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype!r}")
        return _STATE_DTYPES[state_dtype.lower()]
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
    return state_dtype
