"""Data parallelism on one host without DDP: each rank steps only the parameters it owns, and the gradients and
weights move between GPUs by copy engine.

Under DDP every rank all-reduces every gradient (NCCL's kernels take SMs and memory bandwidth from the backward's
matmuls) and then clips and steps the whole model, the same work on every rank. `ShardedSparseAdamW` instead
gives each trainable parameter one owner rank (greedily balanced by size, the same table on every rank):

- backward: once a forward group's gradients (a decoder layer's) are all complete, a hook copies those this rank
  does not own into their owners' landing buffers (on the last micro-step of gradient accumulation only) and drops
  them, a fence waits for the peers' copies of that group, and each owner adds what landed to its own gradients on
  a stream of its own, while the backward goes on;
- clip and step: the norm joins the ranks' square sums (one scalar all-reduce), and SparseAdamW steps the owned
  parameters, applying DDP's 1 / world mean and the clip coefficient as it reads each gradient. Optimizer state
  exists for the owned parameters only: 1 / world of it per rank;
- after the step each owner copies its updated weights into every peer's weight buffer, one forward group (the
  embeddings, a decoder layer, ...) at a time, each with its own fence; a forward pre-hook on the group's module
  waits for that fence only, so the copies hide behind the forward of the groups before it.

On GPUs (`CopyEngineTransport`) the weights and landing buffers live in symmetric memory
(`torch.distributed._symmetric_memory`): a copy onto a peer's buffer is a plain device copy that a copy engine
carries over NVLink, using no SMs, and a fence is symmetric memory's barrier (signal pads) on the copies'
stream. On the CPU (`GlooTransport`) a fence gathers the copies in one collective, and they land when the fence is
waited for: for tests, not for speed.

The result equals DDP with SparseAdamW bit for bit when clipping is inactive (the sum of two gradients does not
depend on its order, and a halving is exact); with clipping the norm's sum runs in a different order (ulps).

    opt = ShardedSparseAdamW(model.parameters(), model=model, lr=1e-5, masks=masks, state_dtype=torch.bfloat16)
    for batch in loader:                         # this rank's share of the global batch
        model(**batch).loss.backward()
        opt.clip_grad_norm_(1.0)                 # the norm of the mean gradient's live blocks
        opt.step()
        opt.zero_grad()
    opt.synchronize()                            # before reading weights outside a forward (saving, comparing)
    state = opt.full_state_dict(rank0_only=True)  # a single-process SparseAdamW's state dict, on rank 0

Limits: one host (symmetric memory needs peer access); every trainable parameter must get a gradient on every rank
at every step, sent once (a step without one, or a second one before the step, raises); no closure in step().
Fences are collectives: every rank must run the same backward graph, so that its groups complete in the same
order everywhere.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .optimizer import SparseAdamW

__all__ = ["CopyEngineTransport", "GlooTransport", "ShardedSparseAdamW", "assign_owners"]

ForwardGroups = Sequence[Tuple[torch.nn.Module, Sequence[torch.nn.Parameter]]]


def assign_owners(sizes: Sequence[int], world: int) -> List[int]:
    """Owner rank of each of `sizes` (elements), in order: each to the least loaded rank so far (ties: lower rank)."""
    load = [0] * world
    owners = []
    for size in sizes:
        rank = min(range(world), key=lambda r: (load[r], r))
        owners.append(rank)
        load[rank] += size
    return owners


class GlooTransport:
    """Buffers in ordinary memory. A fence gathers every rank's copies issued before it (one all_gather_object), and
    they land on a rank only when it waits for the fence's token: the latest a GPU's copies can land, so that the CPU
    tests fail where the code reads a buffer without waiting for it. CPU processes under gloo, for checking the
    algorithm."""

    def __init__(self, group=None):
        self.group = group
        self.pending: List[tuple] = []
        self.buffers: List[torch.Tensor] = []

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> int:
        """Allocate a buffer of `numel` elements on every rank (collective); returns its number."""
        self.buffers.append(torch.zeros(numel, dtype=dtype, device=device))
        return len(self.buffers) - 1

    def local(self, buffer: int) -> torch.Tensor:
        return self.buffers[buffer]

    def send(self, copies: Sequence[Tuple[torch.Tensor, int, int, int]]) -> None:
        """For each (src, rank, buffer, offset): copy `src` (flattened) into rank `rank`'s buffer at `offset`, by
        the next fence."""
        self.pending.extend((rank, buffer, offset, src.detach().reshape(-1).clone())
                            for src, rank, buffer, offset in copies)

    def fence(self) -> list:
        """Every copy that any rank issued before the fence lands here once the fence's token is waited for
        (collective)."""
        everyone: List[Optional[list]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, self.pending, group=self.group)
        self.pending = []
        me = dist.get_rank(self.group)
        return [(buffer, offset, data) for copies in everyone for rank, buffer, offset, data in copies if rank == me]

    def wait(self, token) -> None:
        """Make the caller's work wait for a fence's token: here, land its copies (once)."""
        while token:
            buffer, offset, data = token.pop()
            self.buffers[buffer][offset:offset + data.numel()].copy_(data)

    def after(self, token, work) -> None:
        """Run `work()` once `token` has passed, after the caller's work so far; returns a token for its end."""
        self.wait(token)
        work()
        return None


class CopyEngineTransport:
    """Buffers in symmetric memory; a copy onto a peer's buffer runs on a side stream, where the copy engine moves
    it over NVLink; a fence is symmetric memory's barrier on that stream (each rank raises a flag in every peer's
    signal pad and waits for theirs: one small kernel, launched in microseconds where a collective through a
    process group costs a hundred), and its token is an event the compute stream can wait for."""

    def __init__(self, device: torch.device, group=None):
        import torch.distributed._symmetric_memory as symm_mem  # CUDA builds of torch

        self.symm_mem = symm_mem
        self.device = torch.device(device)
        self.group = group if group is not None else dist.group.WORLD
        self.stream = torch.cuda.Stream(self.device)  # copies and fences
        self.work_stream = torch.cuda.Stream(self.device)  # work that waits for a fence (adding what landed)
        self.buffers: List[torch.Tensor] = []
        self.peers: List[Dict[int, torch.Tensor]] = []
        self._views: Dict[tuple, torch.Tensor] = {}  # (buffer, rank, offset, shape) -> where a copy lands
        # The fences' signal pads come with an allocation: a small one of their own (collective).
        self._signal_buffer = symm_mem.empty(16, dtype=torch.int32, device=self.device)
        self.signals = symm_mem.rendezvous(self._signal_buffer, self.group)

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> int:
        buf = self.symm_mem.empty(numel, dtype=dtype, device=self.device)
        handle = self.symm_mem.rendezvous(buf, self.group)
        me = dist.get_rank(self.group)
        self.buffers.append(buf)
        self.peers.append({r: handle.get_buffer(r, (numel,), dtype) for r in range(dist.get_world_size(self.group))
                           if r != me})
        return len(self.buffers) - 1

    def local(self, buffer: int) -> torch.Tensor:
        return self.buffers[buffer]

    def send(self, copies: Sequence[Tuple[torch.Tensor, int, int, int]]) -> None:
        # One stream switch for all of them: the hooks of a backward call this a few dozen times per step, and the
        # host's time per call is what the GPU may end up waiting for.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the sources were written there
        with torch.cuda.stream(self.stream):
            for src, rank, buffer, offset in copies:
                key = (buffer, rank, offset, src.shape)
                dst = self._views.get(key)
                if dst is None:
                    dst = self._views[key] = self.peers[buffer][rank][offset:offset + src.numel()].view(src.shape)
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.stream)  # its memory is not reused before the copy has read it

    def fence(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # reads of the buffers so far come first
        with torch.cuda.stream(self.stream):
            # Passes on this rank once every rank's stream has reached it: their copies before it have landed.
            self.signals.barrier(channel=0)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, token) -> None:
        torch.cuda.current_stream(self.device).wait_event(token)

    def after(self, token, work):
        # On a stream of its own: beside the compute stream (the backward goes on), behind the fence.
        self.work_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.work_stream.wait_event(token)
        with torch.cuda.stream(self.work_stream):
            work()
            done = torch.cuda.Event()
            done.record(self.work_stream)
        return done


class ShardedSparseAdamW(SparseAdamW):
    """SparseAdamW for data parallelism on one host without DDP (the module docstring says how it works).

    Args (besides SparseAdamW's):
        model: the module the parameters belong to (not wrapped in DDP). Its trainable parameters must be exactly
            the optimizer's, on one device; they are moved into the transport's weight buffers (same Parameter
            objects, new storage), so make this optimizer before anything else keeps a reference to their data.
        forward_groups: [(module, parameters)] in the order the forward first uses them; each group's weights
            are fenced on their own and waited for in a forward pre-hook on its module. Default: one group, the
            whole model, waited for at the model's forward.
        transport: how bytes move (default: CopyEngineTransport on CUDA, GlooTransport on the CPU).
        process_group: the data-parallel ranks (default: the whole world).

    `push_gradients` (default True): set it False during the earlier micro-steps of gradient accumulation, so that
    the gradients accumulate locally and travel once, on the last micro-step.
    """

    def __init__(self, params, *, model: torch.nn.Module, forward_groups: Optional[ForwardGroups] = None,
                 transport=None, process_group=None, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("ShardedSparseAdamW needs a process group: start it under torchrun and call "
                               "torch.distributed.init_process_group first")
        self.process_group = process_group
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        params = list(params)
        super().__init__(params, **kwargs)
        ordered = [p for group in self.param_groups for p in group["params"]]
        trainable = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in ordered} != {id(p) for p in trainable}:
            raise ValueError("ShardedSparseAdamW needs exactly the model's trainable parameters: "
                             f"it got {len(ordered)}, the model has {len(trainable)}")
        devices = {p.device for p in ordered}
        if len(devices) != 1:
            raise ValueError(f"ShardedSparseAdamW needs every parameter on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        if transport is None:
            transport = (CopyEngineTransport(self.device, process_group) if self.device.type == "cuda"
                         else GlooTransport(process_group))
        self.transport = transport
        if forward_groups is None:
            forward_groups = [(model, trainable)]
        self._check_groups(forward_groups, ordered)
        self.forward_groups = [(module, [p for p in params if p.requires_grad]) for module, params in forward_groups]
        # Owners in forward order, so that each group's weights split evenly between the ranks too.
        in_forward_order = [p for _, params in self.forward_groups for p in params]
        self.owner = dict(zip(map(id, in_forward_order),
                              assign_owners([p.numel() for p in in_forward_order], self.world)))
        self.owned = [p for p in ordered if self.owner[id(p)] == self.rank]
        self._layout_buffers()
        self.push_gradients = True
        self._gathered = False  # this step's gradients have been gathered (landed sums added)
        self._pending: Dict[int, object] = {}  # forward group -> the fence its module's pre-hook waits for
        # Backward: when a group's last gradient is complete here, a fence and the add of what landed for it.
        self._forward_group_of = {id(p): index for index, (_, params) in enumerate(self.forward_groups)
                                  for p in params}
        self._group_sizes = [len(params) for _, params in self.forward_groups]
        self._remaining = list(self._group_sizes)  # gradients of each group still to come in this step
        self._outgoing: List[List[torch.nn.Parameter]] = [[] for _ in self.forward_groups]  # complete, not sent
        self._added: List[object] = []  # tokens of this step's adds
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in ordered]
        for index, (module, _) in enumerate(self.forward_groups):
            self._hooks.append(module.register_forward_pre_hook(lambda *_, i=index: self._wait_group(i)))

    # ----------------------------------------------------------------------------------------------- set-up
    def _layout_buffers(self) -> None:
        """One weight buffer and one landing buffer per dtype.

        Weights: every parameter at the same offset on every rank, the parameters re-pointed into it, laid out by
        forward group and within a group by owner, so that an owner sends a group's weights as one copy per peer.
        Landing, on owner o: one slot per other rank, each laid out as o's owned parameters in order (slot size: the
        largest rank's share, so every rank allocates alike)."""
        self._weights: Dict[int, Tuple[int, int]] = {}  # id(p) -> (buffer, offset)
        self._segments: Dict[int, List[Tuple[torch.Tensor, int, int]]] = {}  # group -> [(weights, buffer, offset)]
        self._send_to: Dict[int, Tuple[int, int, int]] = {}  # id(p), not owned -> (owner, buffer, offset there)
        self._landed: Dict[int, List[torch.Tensor]] = {}  # id(p), owned -> the peers' gradients of p, landed here
        everything = [p for _, params in self.forward_groups for p in params]
        for dtype in dict.fromkeys(p.dtype for p in everything):
            same = [p for p in everything if p.dtype == dtype]
            weights = self.transport.buffer(sum(p.numel() for p in same), dtype, self.device)
            flat, offset = self.transport.local(weights), 0
            for index, (_, params) in enumerate(self.forward_groups):
                for owner in range(self.world):
                    start = offset
                    for p in params:
                        if p.dtype == dtype and self.owner[id(p)] == owner:
                            with torch.no_grad():
                                flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
                            p.data = flat[offset:offset + p.numel()].view_as(p)
                            self._weights[id(p)] = (weights, offset)
                            offset += p.numel()
                    if owner == self.rank and offset > start:  # this rank's weights of the group: one copy per peer
                        self._segments.setdefault(index, []).append((flat[start:offset], weights, start))
            share, in_slot = [0] * self.world, []
            for p in same:
                owner = self.owner[id(p)]
                in_slot.append(share[owner])
                share[owner] += p.numel()
            slot = max(share)
            landing = self.transport.buffer(max(1, (self.world - 1) * slot), dtype, self.device)
            local = self.transport.local(landing)
            for p, offset in zip(same, in_slot):
                owner = self.owner[id(p)]
                if owner != self.rank:  # where this rank's gradient of p lands on its owner
                    self._send_to[id(p)] = (owner, landing, self._slot(owner, self.rank) * slot + offset)
                else:  # where each peer's gradient of p lands here
                    self._landed[id(p)] = [local[start:start + p.numel()].view_as(p) for start in
                                           (self._slot(self.rank, sender) * slot + offset
                                            for sender in range(self.world) if sender != self.rank)]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the weights' old storage: symmetric memory is outside PyTorch's allocator

    def _check_groups(self, groups: ForwardGroups, ordered) -> None:
        seen: Dict[int, int] = {}
        for index, (_, params) in enumerate(groups):
            for p in params:
                if p.requires_grad:
                    if id(p) in seen:
                        raise ValueError(f"a parameter is in forward groups {seen[id(p)]} and {index}")
                    seen[id(p)] = index
        missing = [p for p in ordered if id(p) not in seen]
        if missing:
            raise ValueError(f"forward_groups leave out {len(missing)} trainable parameter(s), e.g. one of shape "
                             f"{tuple(missing[0].shape)}")

    def _check_storage(self) -> None:
        """Every parameter still lives in its weight buffer: something that re-points one (a .to() that copies,
        load_state_dict with assign=True) would cut it off from the peers' updates without a sound."""
        for group in self.param_groups:
            for p in group["params"]:
                buffer, offset = self._weights[id(p)]
                local = self.transport.local(buffer)
                if p.data_ptr() != local.data_ptr() + offset * local.element_size():
                    raise RuntimeError(f"{self._describe(p)} no longer lives in ShardedSparseAdamW's weight buffer "
                                       "(its storage was replaced after the optimizer was made): make the optimizer "
                                       "after placing the model, and copy into parameters instead of replacing them")

    def _slot(self, owner: int, sender: int) -> int:
        return sender if sender < owner else sender - 1

    # --------------------------------------------------------------------------------------------- gradients
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        """A post-accumulate-grad hook. Once a forward group's gradients are all complete here: send those this
        rank does not own to their owners, fence, and add what landed for the owned ones (on the transport's work
        stream, while the backward goes on). Kept short: it runs on the backward's thread, once per parameter."""
        if not self.push_gradients:
            return
        index = self._forward_group_of[id(p)]
        if id(p) in self._send_to:
            self._outgoing[index].append(p)
        self._remaining[index] -= 1
        if self._remaining[index] < 0:
            raise RuntimeError("ShardedSparseAdamW got a second gradient for a parameter in one step: with gradient "
                               "accumulation, set push_gradients = False on every micro-step but the last")
        if self._remaining[index] == 0:
            self._exchange(index)

    def _exchange(self, index: int) -> None:
        outgoing, self._outgoing[index] = self._outgoing[index], []
        self.transport.send([(p.grad, *self._send_to[id(p)]) for p in outgoing])
        for p in outgoing:
            p.grad = None  # its owner has it now
        token = self.transport.fence()  # every rank fences every group, in the backward's order
        grads, landed = [], []
        for p in self.forward_groups[index][1]:
            for view in self._landed.get(id(p), ()):
                grads.append(p.grad)
                landed.append(view)
        if grads:
            self._added.append(self.transport.after(token, lambda: torch._foreach_add_(grads, landed)))

    @torch.no_grad()
    def _gather_gradients(self) -> None:
        """Once per step, before the gradients are read: wait for the adds of what landed."""
        if self._gathered:
            return
        self.synchronize()  # a step with no forward since the last one: its weights must be complete
        self._check_storage()
        missing = sum(self._remaining)
        if missing:
            raise RuntimeError(f"{missing} trainable parameter(s) sent no gradient on rank {self.rank} in this step: "
                               "ShardedSparseAdamW needs a gradient for every trainable parameter on every rank at "
                               "every step, sent on the last micro-step (push_gradients = True)")
        self._end_backward()
        self._gathered = True

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The norm of the mean gradient's live blocks over all ranks (collective: every rank calls it)."""
        self._gather_gradients()
        square = super().grad_norm().to(self.device, torch.float32).square()
        dist.all_reduce(square, group=self.process_group)
        return square.sqrt() / self.world

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("ShardedSparseAdamW.step takes no closure")
        self._gather_gradients()
        # The owned gradients hold the ranks' sum: DDP's mean is a scale the step applies as it reads them.
        scale = self._grad_scale if self._grad_scale is not None else torch.ones((), device=self.device)
        self._grad_scale = scale * (1.0 / self.world)
        super().step()
        self._gathered = False
        self._push_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Also after a backward with no step: its adds must be done before the gradients go, and the next backward
        # starts a new count.
        self._end_backward()
        self._gathered = False
        self._outgoing = [[] for _ in self.forward_groups]
        super().zero_grad(set_to_none)

    def _end_backward(self) -> None:
        """The current stream waits for this backward's adds of what landed; the next backward counts afresh."""
        for token in self._added:
            self.transport.wait(token)
        self._added, self._remaining = [], list(self._group_sizes)

    # ---------------------------------------------------------------------------------------------- weights
    def _push_weights(self) -> None:
        for index in range(len(self.forward_groups)):
            self.transport.send([(segment, peer, buffer, offset) for segment, buffer, offset in
                                 self._segments.get(index, ()) for peer in range(self.world) if peer != self.rank])
            self._pending[index] = self.transport.fence()  # every rank fences every group, owner or not

    def _wait_group(self, index: int) -> None:
        token = self._pending.pop(index, None)
        if token is not None:
            self.transport.wait(token)

    def synchronize(self) -> None:
        """Make the current stream wait until every peer's latest weights have landed here: call it before reading
        the weights outside a forward (saving, evaluating by hand, comparing)."""
        for index in list(self._pending):
            self._wait_group(index)

    # ------------------------------------------------------------------------------------------------ state
    def load_state_dict(self, state_dict) -> None:
        """Load a whole-model state dict (a single-process SparseAdamW's, or `full_state_dict()`); each rank keeps
        the moments of the parameters it owns (the masks of all)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if self.owner[id(p)] != self.rank and p in self.state:
                    for key in ("exp_avg", "exp_avg_sq", "step"):
                        self.state[p].pop(key, None)
        self._forget_layouts()

    @torch.no_grad()
    def full_state_dict(self, *, to_cpu: bool = True, rank0_only: bool = False) -> Dict[str, object]:
        """The state dict a single-process SparseAdamW over the whole model would have (collective: each owner
        broadcasts its parameters' moments, one parameter at a time)."""
        local = self.state_dict()
        keep = not rank0_only or self.rank == 0
        out = {}
        for group, saved in zip(self.param_groups, local["param_groups"]):
            for p, index in zip(group["params"], saved["params"]):
                owner = self.owner[id(p)]
                src = owner if self.process_group is None else dist.get_global_rank(self.process_group, owner)
                mine = local["state"].get(index, {})  # every rank holds the masks; the owner the moments
                has = torch.tensor([1 if "exp_avg" in mine else 0, int(mine.get("step", 0))], device=self.device)
                dist.broadcast(has, src=src, group=self.process_group)
                state = {k: v for k, v in mine.items() if k == "block_mask"}
                if int(has[0]):
                    shape = self._layout(p, group).state_shape if "block_mask" in state else tuple(p.shape)
                    for key in ("exp_avg", "exp_avg_sq"):
                        value = mine[key] if owner == self.rank else torch.empty(shape, dtype=self.state_dtype,
                                                                                  device=self.device)
                        dist.broadcast(value, src=src, group=self.process_group)
                        state[key] = value
                    state["step"] = int(has[1])
                if keep and state:
                    out[index] = {k: (v.to("cpu", copy=True) if to_cpu else v.clone())
                                  if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return {"state": out, "param_groups": local["param_groups"]} if keep else {}

    def buffer_bytes(self) -> int:
        """Bytes of this rank's weight and landing buffers (on GPUs symmetric memory, which PyTorch's allocator
        statistics leave out)."""
        return sum(buf.numel() * buf.element_size() for buf in self.transport.buffers)
