"""Fused masked AdamW in Triton: one launch updates every live block of many parameters of one dtype.

Each program updates K live blocks of one parameter, a [K, BH, BW] tile. Small tables give each parameter's shape
(uploaded once per set of layouts), its addresses (per step: grads are reallocated) and its step's scalars and
rounding-seed mix (one row per distinct lr, step and seed: a scheduler changes them). They are plain data, so
nothing recompiles. Pruned blocks are not in the live list: no program reads or writes them.

`step` builds the per-step table from scratch; `PreparedStep` keeps all of it but the gradient addresses, for
SparseAdamW.step's fast path.
"""
from __future__ import annotations

import math
import os
from array import array
from typing import Dict, List

import torch
import triton
import triton.language as tl

from ..backends import hyper_row, index_mix, seed_mix
from ..layout import program_map

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _hash32(index, seed):
    """murmur3's finaliser of (index, seed): the same 32 bits as sparse_adamw.reference.hash32."""
    return _fmix32((index * 0x9E3779B1) ^ seed)


@triton.jit
def _fmix32(h):
    """murmur3's finaliser of uint32 h (sparse_adamw.backends.fmix32)."""
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
    seed_mix_ptr,
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
    # exp_avg, exp_avg_sq addresses, index mix (sparse_adamw.backends.index_mix of its position), row r of the hyper
    # table (fp32): decay, b1, 1-b1, b2, 1-b2, eps, lr/bc1, 1/sqrt(bc2); tensors with the same hyper-parameters and
    # step share one. seed_mix[r] (int64): the rounding seed's mix of optimizer seed and step.
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

    row = tl.load(dyn + 5)
    hyper = hyper_ptr + row * 8
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
        seed = _fmix32((tl.load(seed_mix_ptr + row) ^ tl.load(dyn + 4)).to(tl.uint32))  # backends.rounding_seed
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


def _upload(dyn: array, seed_mixes: List[int], hyper: List[List[float]], device: torch.device):
    """The step's tables in one copy (each copy costs host time): int64 step rows, int64 seed mixes, fp32 hyper rows.
    Python arrays, not tensor ops: a small torch op costs 10 to 20 us of host time on a slow CPU."""
    data = bytearray(dyn.tobytes() + array("q", seed_mixes).tobytes()
                     + array("f", [x for row in hyper for x in row]).tobytes())
    tables = torch.frombuffer(data, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned and non-blocking: a pageable copy would wait for the whole stream (the backward pass) to finish.
        tables = tables.pin_memory().to(device, non_blocking=True)
    n_dyn, n_rows = len(dyn), len(seed_mixes)
    return tables[:n_dyn], tables[n_dyn:n_dyn + n_rows], tables[n_dyn + n_rows:].view(torch.float32)


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
        STOCHASTIC=first.seed is not None and first.param.dtype == torch.bfloat16,
    )


def _launch(plan, constants: Dict, tables, aligned: bool) -> None:
    shapes, prog_tensor, block_ids, index_64, check_edges, plan_aligned = plan
    _sparse_adamw_kernel[(prog_tensor.numel(),)](
        shapes, *tables, prog_tensor, block_ids, INDEX_64=index_64, CHECK_EDGES=check_edges,
        ALIGNED=plan_aligned and aligned, num_warps=NUM_WARPS, **constants)


def _k(block) -> int:
    return BLOCKS_PER_PROGRAM or _blocks_per_program(block)


def step(updates, cache: Dict) -> None:
    """Update `updates` (one device, param dtype, grad dtype and state dtype) in one launch."""
    updates = [u for u in updates if u.layout.numel and u.layout.n_live]
    if not updates:
        return
    plan = _plan(updates, cache, _k(updates[0].layout.block))
    # Per step: addresses (grads may be new tensors), and one hyper row and seed mix per distinct (lr, betas, eps,
    # weight decay, step, seed). SparseAdamW.step takes PreparedStep instead when a step repeats the last one.
    dyn = array("q")
    rows: Dict[tuple, int] = {}
    addresses = 0
    for u in updates:
        row = rows.setdefault((u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.step, u.seed), len(rows))
        p, g, m, v = u.param.data_ptr(), u.grad.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()
        addresses |= p | g | m | v
        dyn.extend((p, g, m, v, index_mix(u.index), row))
    mixes = [0 if key[-1] is None else seed_mix(key[-1], key[5]) for key in rows]
    tables = _upload(dyn, mixes, [hyper_row(*key[:6]) for key in rows], updates[0].param.device)
    _launch(plan, _constants(updates), tables, aligned=addresses % 16 == 0)


class PreparedStep:
    """A launch whose per-tensor facts stay from one step to the next: SparseAdamW's fast path.

    Made from one step's updates and the hyper row each reads. The plan, the param and state addresses, the index
    mixes and the rows are kept; each `run` brings only the new gradient addresses, hyper rows and seed mixes. The
    caller checks that params and states are still the ones given here. It holds no gradient: they are freed
    between steps.
    """

    def __init__(self, updates, rows: List[int], cache: Dict):
        self.kept = [i for i, u in enumerate(updates) if u.layout.numel and u.layout.n_live]
        kept = [updates[i] for i in self.kept]
        self.device = updates[0].param.device
        self.plan = _plan(kept, cache, _k(kept[0].layout.block)) if kept else None
        self.constants = _constants(kept) if kept else None
        template: List[int] = []  # step rows, gradient addresses left 0
        self.static_addresses = 0
        for i, u in zip(self.kept, kept):
            p, m, v = u.param.data_ptr(), u.exp_avg.data_ptr(), u.exp_avg_sq.data_ptr()
            self.static_addresses |= p | m | v
            template += (p, 0, m, v, index_mix(u.index), rows[i])
        self.template = array("q", template)
        if len(self.kept) == len(updates):
            self.kept = None  # run() need not pick

    def run(self, grad_ptrs: List[int], hyper: List[List[float]], seed_mixes: List[int]) -> None:
        """grad_ptrs: of all the updates given at construction, in their order."""
        if self.plan is None:
            return
        if self.kept is not None:
            grad_ptrs = [grad_ptrs[i] for i in self.kept]
        dyn = array("q", self.template)
        dyn[1::6] = array("q", grad_ptrs)
        addresses = self.static_addresses
        for g in grad_ptrs:
            addresses |= g
        _launch(self.plan, self.constants, _upload(dyn, seed_mixes, hyper, self.device), aligned=addresses % 16 == 0)
