"""Fused masked AdamW in Triton: one launch updates every live block of many parameters of one dtype.

Each program updates K live blocks of one parameter, a [K, BH, BW] tile. Small tables give each parameter's shape
(uploaded once per set of layouts), its addresses and rounding seed (per step: grads are reallocated) and its
step's scalars (one row per distinct lr and step: a scheduler changes them). They are plain data, so nothing
recompiles. Pruned blocks are not in the live list: no program reads or writes them.
"""
from __future__ import annotations

import math
import os
from array import array
from typing import Dict, List

import torch
import triton
import triton.language as tl

from ..backends import hyper_row
from ..layout import program_map

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _hash32(index, seed):
    """murmur3's finaliser of (index, seed): the same 32 bits as sparse_adamw.reference.hash32."""
    h = (index * 0x9E3779B1) ^ seed
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _store_bf16_stochastic(ptr, x, mask, index, seed):
    """Round to bf16 up with probability equal to the dropped fraction (reference.round_to_bf16_stochastic)."""
    bits = x.to(tl.uint32, bitcast=True) + (_hash32(index, seed) & 0xFFFF)
    tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def _store(ptr, x, mask, DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Store fp32 `x` as DTYPE, rounding to nearest even."""
    if DTYPE == tl.bfloat16 and EXACT_BF16:
        # By hand: the interpreter's fp32 -> bf16 cast truncates; the GPU's cast is already exact. NaN and inf
        # survive.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _sparse_adamw_kernel(
    shape_ptr,
    dyn_ptr,
    hyper_ptr,
    prog_tensor_ptr,
    block_ids_ptr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    K: tl.constexpr,
    INDEX_64: tl.constexpr,
    CHECK_EDGES: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    # Per tensor t: shape row (int64, uploaded once per set of layouts): rows, cols, numel, block cols, live blocks,
    # first program, row shift (a shard starting mid-block), flat index of element 0. Step row (int64): param, grad,
    # exp_avg, exp_avg_sq addresses, rounding seed, row of the hyper table (fp32): decay, b1, 1-b1, b2, 1-b2, eps,
    # lr/bc1, 1/sqrt(bc2); tensors with the same hyper-parameters and step share one.
    # block_ids holds K block ids per program, so that load does not wait for the tables.
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    block_id = tl.load(block_ids_ptr + pid.to(tl.int64) * K + tl.arange(0, K))
    dyn = dyn_ptr + t * 6
    shape = shape_ptr + t * 8
    p_ptr = tl.load(dyn + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(dyn + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(dyn + 2).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(dyn + 3).to(tl.pointer_type(S_DTYPE))
    # int32 index math unless some tensor of this launch is too large for it: half the registers and ops.
    idx = tl.int64 if INDEX_64 else tl.int32
    rows = tl.load(shape + 0).to(idx)
    cols = tl.load(shape + 1).to(idx)
    numel = tl.load(shape + 2).to(idx)
    n_block_cols = tl.load(shape + 3).to(idx)
    n_live = tl.load(shape + 4).to(idx)
    prog0 = tl.load(shape + 5).to(idx)
    row_shift = tl.load(shape + 6).to(idx)
    if ALIGNED:
        # Addresses cast from integers carry no alignment; without these hints every access is scalar.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        cols = tl.multiple_of(cols, 16)

    hyper = hyper_ptr + tl.load(dyn + 5) * 8
    decay = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    one_minus_beta1 = tl.load(hyper + 2)
    beta2 = tl.load(hyper + 3)
    one_minus_beta2 = tl.load(hyper + 4)
    eps = tl.load(hyper + 5)
    step_size = tl.load(hyper + 6)
    inv_bc2_sqrt = tl.load(hyper + 7)

    # Ordinals of this program's blocks among the parameter's live blocks = their compact-state slots.
    slot = (pid.to(idx) - prog0) * K + tl.arange(0, K).to(idx)
    slot_ok = slot < n_live
    block_id = block_id.to(idx)
    block_row = block_id // n_block_cols
    block_col = block_id % n_block_cols

    # A [K, TILE_H, TILE_W] tile. (A [TILE_H, K, TILE_W] order, a warp reading a row across neighbouring
    # blocks, measured slower on H100 and H200.)
    r3 = tl.arange(0, TILE_H).to(idx)[None, :, None]
    c = tl.arange(0, TILE_W).to(idx)[None, None, :]
    slot3 = slot[:, None, None]
    row3 = block_row[:, None, None] * BH + r3 - row_shift
    col3 = block_col[:, None, None] * BW + c
    offs = row3 * cols + col3
    state_offs = slot3 * (BH * BW) + r3 * BW + c
    ok = slot_ok[:, None, None]
    if CHECK_EDGES:  # partial blocks somewhere in this launch
        ok = ok & (r3 < BH) & (c < BW) & (row3 >= 0) & (row3 < rows) & (col3 < cols) & (offs < numel)

    p = tl.load(p_ptr + offs, mask=ok).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    m = tl.load(m_ptr + state_offs, mask=ok).to(tl.float32)
    v = tl.load(v_ptr + state_offs, mask=ok).to(tl.float32)

    # DESIGN.md section 1, in torch.optim.AdamW's order. Fast sqrt and division: their few-ulp error in the
    # update is far below the rounding of p itself.
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    p = p - step_size * (m / denom)

    if STOCHASTIC:
        seed = tl.load(dyn + 4).to(tl.uint32)
        index = (tl.load(shape + 7) + offs).to(tl.uint32)  # flat index in the whole param, mod 2**32
        _store_bf16_stochastic(p_ptr + offs, p, ok, index, seed)
    else:
        _store(p_ptr + offs, p, ok, P_DTYPE, EXACT_BF16)
    _store(m_ptr + state_offs, m, ok, S_DTYPE, EXACT_BF16)
    _store(v_ptr + state_offs, v, ok, S_DTYPE, EXACT_BF16)


# Launch parameters; 0 blocks per program picks about 4096 elements. Benchmarks set these to sweep them.
BLOCKS_PER_PROGRAM = 0
NUM_WARPS = 8
_INT32_LIMIT = 2**31  # tests lower it to exercise the int64 path


def _blocks_per_program(block) -> int:
    # About 4096 elements per program, 16 per thread at 8 warps: the best of interleaved sweeps on the H100
    # (benchmarks/RESULTS.md); more per thread spills registers.
    return max(1, triton.next_power_of_2(max(1, 4096 // (block[0] * block[1]))))


def _plan(updates, cache: Dict, k: int):
    """Static part of a launch, cached per set of layouts: the shape table, program -> tensor map, block ids."""
    key = ("triton_plan", k) + tuple(id(u.layout) for u in updates)
    hit = cache.get(key)
    if hit is not None and all(a is u.layout for a, u in zip(hit[0], updates)):
        return hit[1:]
    bh, bw = updates[0].layout.block
    check_edges = triton.next_power_of_2(bh) != bh or triton.next_power_of_2(bw) != bw
    aligned = bw % 16 == 0
    index_64 = False
    shapes: List[List[int]] = []
    n_prog = 0
    for u in updates:
        lay = u.layout
        shapes.append([lay.rows, lay.cols, lay.numel, lay.n_block_cols, lay.n_live, n_prog, lay.row_shift,
                       lay.index_base])
        check_edges |= bool(lay.rows % bh or lay.cols % bw or lay.numel != lay.rows * lay.cols or lay.row_shift)
        aligned &= lay.cols % 16 == 0
        # Offsets reach past the last row/column in edge blocks, and past the last slot in the last program.
        index_64 |= max((lay.rows + bh) * (lay.cols + bw), (lay.n_live + k) * bh * bw) >= _INT32_LIMIT
        n_prog += math.ceil(lay.n_live / k)
    device = updates[0].param.device
    prog_tensor, block_ids = (t.to(device) for t in program_map([u.layout for u in updates], k))
    shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    cache[key] = ([u.layout for u in updates], shapes, prog_tensor, block_ids, index_64, check_edges, aligned)
    return cache[key][1:]


def _upload(dyn: List[int], hyper: List[List[float]], device: torch.device):
    """The step's int64 table and fp32 hyper table, in one copy (each copy costs host time)."""
    data = bytearray(array("q", dyn).tobytes() + array("f", [x for row in hyper for x in row]).tobytes())
    return _to_device(torch.frombuffer(data, dtype=torch.int64), len(dyn), device)


def _to_device(tables: torch.Tensor, n_dyn: int, device: torch.device):
    if device.type == "cuda":
        # Pinned and non-blocking: a pageable copy would wait for the whole stream (the backward pass) to finish.
        tables = tables.pin_memory().to(device, non_blocking=True)
    return tables[:n_dyn], tables[n_dyn:].view(torch.float32)


def _constants(updates) -> Dict:
    """The launch's compile-time arguments (all but ALIGNED and the plan's flags): from dtypes and block shape."""
    first = updates[0]
    block = first.layout.block
    return dict(
        P_DTYPE=_TL_DTYPES[first.param.dtype],
        G_DTYPE=_TL_DTYPES[first.grad.dtype],
        S_DTYPE=_TL_DTYPES[first.exp_avg.dtype],
        BH=block[0], BW=block[1],
        TILE_H=triton.next_power_of_2(block[0]), TILE_W=triton.next_power_of_2(block[1]),
        K=_k(block),
        EXACT_BF16=os.environ.get("TRITON_INTERPRET") == "1",
        STOCHASTIC=first.rounding_seed is not None and first.param.dtype == torch.bfloat16,
    )


def _launch(plan, constants: Dict, dyn: torch.Tensor, hyper: torch.Tensor, aligned: bool) -> None:
    shapes, prog_tensor, block_ids, index_64, check_edges, plan_aligned = plan
    _sparse_adamw_kernel[(prog_tensor.numel(),)](
        shapes, dyn, hyper, prog_tensor, block_ids, INDEX_64=index_64, CHECK_EDGES=check_edges,
        ALIGNED=plan_aligned and aligned, num_warps=NUM_WARPS, **constants)


def _k(block) -> int:
    return BLOCKS_PER_PROGRAM or _blocks_per_program(block)


def _live(updates):
    return [u for u in updates if u.layout.numel and u.layout.n_live]


def step(updates, cache: Dict) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one launch."""
    updates = _live(updates)
    if not updates:
        return
    plan = _plan(updates, cache, _k(updates[0].layout.block))
    # Per step: addresses (grads may be new tensors), seeds, and one hyper row per distinct (lr, betas, eps,
    # weight decay, step). SparseAdamW.step takes PreparedStep instead once a step repeats the last one's shape.
    dyn: List[int] = []
    hyper_rows: Dict[tuple, int] = {}
    addresses = 0
    for u in updates:
        key = (u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.step)
        row = hyper_rows.setdefault(key, len(hyper_rows))
        p, g, m, v = u.param.data_ptr(), u.grad.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()
        addresses |= p | g | m | v
        dyn += (p, g, m, v, u.rounding_seed or 0, row)
    _launch(plan, _constants(updates),
            *_upload(dyn, [hyper_row(*key) for key in hyper_rows], updates[0].param.device),
            aligned=addresses % 16 == 0)


class PreparedStep:
    """A launch whose per-tensor facts stay from one step to the next: SparseAdamW's fast path.

    Made from one step's updates and the hyper row each will read. The param and state addresses, the rows and
    the plan are kept; each `run` brings only the new gradient addresses, rounding seeds and hyper rows, as
    tensors, so a step's host time no longer grows with Python work per tensor. The caller checks that params
    and states are still the ones given here.
    """

    def __init__(self, updates, rows: List[int], cache: Dict):
        # Holds no gradient: they are freed between steps.
        self.kept = [i for i, u in enumerate(updates) if u.layout.numel and u.layout.n_live]
        kept = [updates[i] for i in self.kept]
        self.device = updates[0].param.device
        self.plan = _plan(kept, cache, _k(kept[0].layout.block)) if kept else None
        self.constants = _constants(kept) if kept else None
        self.template = torch.tensor(
            [[u.param.data_ptr(), 0, u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr(), 0, rows[i]]
             for i, u in zip(self.kept, kept)], dtype=torch.int64).reshape(-1, 6)
        self.static_aligned = not bool((self.template & 15).any())
        self.index = torch.tensor(self.kept, dtype=torch.int64) if len(self.kept) < len(updates) else None

    def run(self, grad_ptrs: torch.Tensor, seeds, hyper: List[List[float]]) -> None:
        """grad_ptrs, seeds: int64 CPU tensors over all the updates given at construction (seeds may be None)."""
        if self.plan is None:
            return
        if self.index is not None:
            grad_ptrs = grad_ptrs[self.index]
            seeds = None if seeds is None else seeds[self.index]
        n_dyn, n_hyper = self.template.numel(), 8 * len(hyper)
        pin = self.device.type == "cuda"
        tables = torch.empty(n_dyn + (n_hyper + 1) // 2, dtype=torch.int64, pin_memory=pin)
        dyn = tables[:n_dyn].view(-1, 6)
        dyn.copy_(self.template)
        dyn[:, 1] = grad_ptrs
        if seeds is not None:
            dyn[:, 4] = seeds
        tables[n_dyn:].view(torch.float32)[:n_hyper] = torch.tensor(hyper, dtype=torch.float32).view(-1)
        aligned = self.static_aligned and not bool((grad_ptrs & 15).any())
        if pin:
            tables = tables.to(self.device, non_blocking=True)
        _launch(self.plan, self.constants, tables[:n_dyn], tables[n_dyn:].view(torch.float32), aligned)
