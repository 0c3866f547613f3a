"""SparseAdamW: a drop-in torch.optim.Optimizer that updates only the live blocks of block-pruned weights."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import torch

from .dtensor import distributed, full_tensor, is_dtensor, local_tensor, row_offset
from .backends import ParamUpdate, hyper_row, requested_impl, seed_mix, select_backend
from .layout import BlockLayout, compact_to_dense, dense_to_compact, new_state
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
        stochastic_rounding: round updated bf16 params up with probability equal to the dropped fraction, so that
            updates smaller than half a bf16 ulp are kept in expectation. None (default) = on for bf16 params.
            float16 params always round to nearest.
        seed: seeds the rounding's counter-based random bits (per parameter and step): runs are reproducible.

    Pruned blocks are never read or written: they stay bitwise as they are whatever their gradient holds, and
    they have no optimizer state (see `sparse_adamw.layout` for the compact state format).
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
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        block_size=normalize_block_size(block_size), stochastic_rounding=stochastic_rounding,
                        seed=int(seed))
        requested_impl(impl)  # validate early
        self.impl = impl
        self.state_dtype = _state_dtype(state_dtype)
        self._layouts: Dict[torch.Tensor, BlockLayout] = {}
        self._entries: Dict[int, tuple] = {}  # id(p) -> (p, layout, state, is DTensor): step()'s per-tensor facts
        self._kernel_cache: Dict = {}
        self._backends: Dict = {}
        self._fast: Optional[_FastPlan] = None  # step()'s fast path, see _prepare_fast
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
            leaked = int(leaked_blocks(full_tensor(p), mask, group["block_size"]).sum()) if check else 0
            if leaked:
                logger.warning("%s has nonzeros in %d blocks its mask marks pruned; SparseAdamW leaves them as they "
                               "are (sparse_adamw.masks.apply_block_mask_ zeros them)", self._describe(p), leaked)
            self.state[p]["block_mask"] = mask

    def set_masks(self, masks: Union[str, Dict[torch.Tensor, torch.Tensor]], *, check: bool = True) -> None:
        """Give parameters block masks after construction: `"auto"` or `{param: mask}`, as the `masks` argument.

        Only before a parameter's first step (its moments are laid out by its mask). Meant for wrappers that swap
        the optimizer's parameters after it is built, as accelerate's FSDP2 preparation does: set the masks on
        the parameters that are there now. A DTensor (FSDP2) parameter takes the mask of the whole parameter;
        every rank must call this with the same masks, in the same order (each parameter is gathered once to
        check its zeros).

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
        if self._fast is not None and self._fast_step():
            return loss
        self._fast = None
        # The general path: every check and every fact per tensor, in Python (about 3.5 us per tensor on a fast
        # CPU, 10 on the GPU machine's). When this step qualifies, _prepare_fast makes the next ones cheap.
        batches: Dict[tuple, list] = {}
        where: Dict[tuple, list] = {}  # batch -> (group number, param position) of each update
        entries = self._entries
        index = -1
        for group_number, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay, seed = float(group["lr"]), group["eps"], group["weight_decay"], group["seed"]
            stochastic = group["stochastic_rounding"] is not False
            for p in group["params"]:
                index += 1
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
                grad = grad.contiguous()
                step = state["step"] = state["step"] + 1
                exp_avg = state["exp_avg"]
                update = ParamUpdate(p, grad, exp_avg, state["exp_avg_sq"], layout, step, lr, beta1, beta2, eps,
                                     weight_decay, seed if stochastic else None, index)
                key = (p.device, p.dtype, grad.dtype, exp_avg.dtype, layout.block, stochastic)
                batches.setdefault(key, []).append(update)
                where.setdefault(key, []).append((group_number, index))
        for (device, *dtypes, _, _), updates in batches.items():
            self._backend(device, tuple(dtypes)).step(updates, self._kernel_cache)
        self._fast = self._prepare_fast(batches, where)
        return loss

    # The fast path. After a step in which every gradient was contiguous, no parameter was sharded and every backend
    # could prepare its launch (Triton), the next steps check each tensor in a few attribute reads and hand the
    # backends only the new gradient addresses and, per group and step count, one hyper row and one rounding-seed
    # mix. Parameters without a gradient (frozen ones) must stay without one. Anything else falls back to the
    # loop above.
    def _prepare_fast(self, batches, where) -> Optional["_FastPlan"]:
        rows: Dict[tuple, int] = {}  # (group number, step count) -> hyper row
        facts = {}  # position -> what the next steps check
        for key, updates in batches.items():
            if not hasattr(self._backend(key[0], tuple(key[1:4])), "PreparedStep"):
                return None
            for u, (group_number, index) in zip(updates, where[key]):
                if u.grad is not u.param.grad:
                    return None  # sharded (the update holds the local shard), or a gradient made contiguous
                rows.setdefault((group_number, u.step), len(rows))
                facts[index] = (u.param, self.state[u.param], u.exp_avg, u.exp_avg_sq, u.param.data_ptr(),
                                u.grad.dtype, u.param.shape, u.step)
        slot = {index: i for i, index in enumerate(sorted(facts))}  # position -> place among the gradients
        prepared = []
        for key, updates in batches.items():
            row_ids = [rows[(group_number, u.step)] for u, (group_number, _) in zip(updates, where[key])]
            slots = [slot[index] for _, index in where[key]]
            launch = self._backend(key[0], tuple(key[1:4])).PreparedStep(updates, row_ids, self._kernel_cache)
            prepared.append((launch, None if slots == list(range(len(slot))) else slots))
        groups, position = [], 0
        for group in self.param_groups:
            groups.append([facts.get(position + i) for i in range(len(group["params"]))])
            position += len(group["params"])
        flags = [(group["block_size"], group["stochastic_rounding"] is not False) for group in self.param_groups]
        return _FastPlan(groups, flags, list(rows), prepared)

    def _fast_step(self) -> bool:
        """One step on the prepared plan; False (nothing changed) where this step differs from the plan's."""
        plan = self._fast
        groups = self.param_groups
        if len(groups) != len(plan.groups):
            return False
        done = plan.done
        grad_ptrs: List[int] = []
        append = grad_ptrs.append
        try:
            for group, group_facts, flags in zip(groups, plan.groups, plan.flags):
                params = group["params"]
                if (len(params) != len(group_facts)
                        or (group["block_size"], group["stochastic_rounding"] is not False) != flags):
                    return False
                for p, fact in zip(params, group_facts):
                    grad = p.grad
                    if fact is None:  # had no gradient
                        if grad is not None:
                            return False
                        continue
                    q, state, exp_avg, exp_avg_sq, p_ptr, grad_dtype, shape, step = fact
                    if (p is not q or grad is None or grad.dtype != grad_dtype or grad.shape != shape
                            or not grad.is_contiguous() or p.data_ptr() != p_ptr or state["step"] != step + done
                            or state["exp_avg"] is not exp_avg or state["exp_avg_sq"] is not exp_avg_sq):
                        return False
                    append(grad.data_ptr())
        except (RuntimeError, KeyError):  # a sparse gradient has no is_contiguous; a state was emptied
            return False
        plan.done = done = done + 1
        for group_facts in plan.groups:
            for fact in group_facts:
                if fact is not None:
                    fact[1]["step"] = fact[7] + done
        hyper, mixes = [], []
        for group_number, step in plan.rows:
            group = groups[group_number]
            beta1, beta2 = group["betas"]
            step += done
            hyper.append(hyper_row(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], step))
            mixes.append(seed_mix(group["seed"], step))
        for launch, slots in plan.prepared:
            launch.run(grad_ptrs if slots is None else [grad_ptrs[i] for i in slots], hyper, mixes)
        return True

    # ----------------------------------------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict) -> None:
        # torch casts every floating state tensor to the param's dtype (and masks too); ours keep their dtype.
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, copy=True)
                self._check_loaded_state(p, group)
        self._forget_layouts()

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
    @torch.no_grad()
    def full_state_dict(self, *, to_cpu: bool = True, rank0_only: bool = False) -> Dict[str, object]:
        """The state dict a single-process SparseAdamW over the whole parameters would have.

        Under FSDP2 every rank must call this, in the same order relative to other collectives: each sharded
        parameter's moments are gathered (one parameter at a time). For plain parameters (one process, DDP) it is
        `state_dict()` with its tensors copied.

        Format: exactly `state_dict()`'s, `{"state": {index: {...}}, "param_groups": [...]}` with parameters
        numbered in param-group order, and for each parameter that has state:

        * "block_mask": the whole parameter's bool block mask, shape (ceil(R/bh), ceil(C/bw)), True = live;
        * "step": the number of steps taken (an int);
        * "exp_avg", "exp_avg_sq": for a masked parameter the compact state of the whole parameter, shape
          (n_live, bh, bw), slot s holding the s-th live block of the whole mask in row-major order
          (`sparse_adamw.layout`); for a parameter without a mask, the whole parameter's shape.

        A block that straddles two row shards has a slot on both ranks, each holding its own rows; here the two
        halves are joined into one slot. So this dict loads into a single-process SparseAdamW with
        `load_state_dict`, and into any sharding of the same parameters with `load_full_state_dict`.

        torch.distributed.checkpoint's `get_optimizer_state_dict` / `set_optimizer_state_dict` (what accelerate's
        FSDP2 checkpointing calls) assume that every state tensor is shaped and sharded like its parameter. Compact
        states are not, so use this method (or the per-rank `state_dict()`) instead.

        Args:
            to_cpu: move the tensors to the CPU as they are gathered (default), so that only one parameter's
                moments are on the device at a time.
            rank0_only: return the dict on rank 0 only ({} elsewhere); every rank still takes part in the gathers.
        """
        local = self.state_dict()
        keep = not rank0_only or not distributed() or torch.distributed.get_rank() == 0
        out_state = {}
        for group, saved_group in zip(self.param_groups, local["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                if index not in local["state"]:
                    continue
                state = {}
                for key, value in local["state"][index].items():
                    if key in ("exp_avg", "exp_avg_sq") and is_dtensor(p):
                        value = self._gather_moment(p, group, value)
                    if isinstance(value, torch.Tensor):
                        value = value.to("cpu", copy=True) if to_cpu else value.clone()
                    state[key] = value
                if keep:
                    out_state[index] = state
        if not keep:
            return {}
        return {"state": out_state, "param_groups": local["param_groups"]}

    def _gather_moment(self, p: torch.Tensor, group, value: torch.Tensor) -> torch.Tensor:
        """One moment of an FSDP2 parameter, whole: compact (whole mask) for a masked parameter, else param-shaped."""
        from torch.distributed.tensor import DTensor

        layout = self._layout(p, group)
        local = local_tensor(p)
        dense = value if layout.mask is None else compact_to_dense(value, layout.mask, local.shape, layout.block,
                                                                   layout.row_shift)
        whole = DTensor.from_local(dense.reshape(local.shape).contiguous(), p.device_mesh, p.placements,
                                   run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
        mask = self.state[p].get("block_mask")
        return whole if mask is None else dense_to_compact(whole, mask, layout.block)

    @torch.no_grad()
    def load_full_state_dict(self, state_dict) -> None:
        """Load a whole-parameter state dict (`full_state_dict()`'s format, which is also what a single-process
        SparseAdamW's `state_dict()` holds) into this optimizer, whose parameters may be FSDP2 row shards.

        Every rank passes the same dict; each keeps the rows of its own shard. No collectives: a dict opened
        with `torch.load(..., mmap=True)` is read only where this rank's rows lie. Resuming on a different
        number of ranks, or moving between one process and FSDP2, works both ways.
        """
        local_state = {}
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                if index not in state_dict["state"]:
                    continue
                state = dict(state_dict["state"][index])
                if is_dtensor(p):
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            state[key] = self._shard_moment(p, group, state[key], state.get("block_mask"), key)
                local_state[index] = state
        self.load_state_dict({"state": local_state, "param_groups": state_dict["param_groups"]})

    def _shard_moment(self, p: torch.Tensor, group, whole: torch.Tensor, mask, key: str) -> torch.Tensor:
        """This rank's part of one whole-parameter moment, in the compact format of its row shard."""
        local = local_tensor(p)
        offset, rows = row_offset(p, self._describe(p)), local.shape[0] if local.dim() else 0
        if mask is None:
            if tuple(whole.shape) != tuple(p.shape):
                raise ValueError(f"loaded {key} of shape {tuple(whole.shape)} does not fit {self._describe(p)}")
            return whole[offset:offset + rows].clone()
        bh = group["block_size"][0]
        self._check_mask(p, mask.to(p.device), group["block_size"])
        per_row = mask.sum(dim=1).tolist()
        if tuple(whole.shape) != (sum(per_row), *group["block_size"]):
            raise ValueError(f"loaded {key} of shape {tuple(whole.shape)} does not fit {self._describe(p)}: "
                             f"expected {(sum(per_row), *group['block_size'])}")
        first = offset // bh
        end = -(-(offset + rows) // bh) if rows else first
        start, n = sum(per_row[:first]), sum(per_row[first:end])
        shard = whole[start:start + n].clone()
        if n:
            # Rows of a straddling block that belong to the neighbouring shard are never read or written here:
            # zero them, as in a state that was never loaded.
            shard[:per_row[first], :offset - first * bh] = 0
            shard[n - per_row[end - 1]:, offset + rows - (end - 1) * bh:] = 0
        return shard

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


class _FastPlan:
    def __init__(self, groups: List[list], flags: List[tuple], rows: List[tuple], prepared: List[tuple]):
        # Per group, per param: (param, state, exp_avg, exp_avg_sq, param address, grad dtype, shape, step count),
        # or None for a parameter that had no gradient.
        self.groups = groups
        self.flags = flags  # per group: (block size, stochastic rounding), which the launches were prepared for
        self.rows = rows  # per hyper row: (group number, step count)
        self.prepared = prepared  # per launch: (backend's PreparedStep, its gradients' places, or None for all)
        self.done = 0  # steps taken on this plan: every step count above has grown by this much


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
