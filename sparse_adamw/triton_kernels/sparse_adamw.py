"""The fused masked AdamW kernel in Triton: one launch updates every live block of many parameters of one dtype.

A leaf: it knows only torch, triton and the tables `launch` describes; sparse_adamw.backends.triton_impl builds
them from the optimizer's updates. Each program updates K live blocks of one parameter, a [K, BH, BW] tile; pruned
blocks are not in the live list, so no program reads or writes them. The tables are plain data: a new learning
rate, step or gradient address recompiles nothing. For clipping, `launch_square_sum` reads the gradients' live
blocks through the same tables, and the step can multiply each gradient by a scale held on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _hash32(index, seed):
    """murmur3's finaliser of (index, seed): the same 32 bits as sparse_adamw.reference.hash32."""
    return _fmix32((index * 0x9E3779B1) ^ seed)


@triton.jit
def _fmix32(h):
    """murmur3's finaliser of uint32 h (sparse_adamw.reference.fmix32)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _store_bf16_stochastic(ptr, x, mask, random16):
    """Round to bf16 up with probability equal to the dropped fraction, given 16 random bits per element
    (reference.round_to_bf16_stochastic)."""
    bits = x.to(tl.uint32, bitcast=True) + random16
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
def _adamw(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bc2_sqrt):
    """sparse_adamw.reference.adamw_math in fp32, in torch.optim.AdamW's order. Fast sqrt and division: their
    few-ulp error in the update is far below the rounding of p itself."""
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    return p - step_size * (m / denom), m, v


@triton.jit
def _tile(shape, pid, block_id, BH: tl.constexpr, BW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
          K: tl.constexpr, INDEX_64: tl.constexpr, CHECK_EDGES: tl.constexpr, ALIGNED: tl.constexpr):
    """A program's [K, TILE_H, TILE_W] tile of K live blocks of one tensor (its row `shape` of the shape table):
    element offsets in the tensor, offsets in its compact state, and which elements exist."""
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
        cols = tl.multiple_of(cols, 16)

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
    return offs, state_offs, ok


@triton.jit
def _sparse_adamw_kernel(shape_ptr, dyn_ptr, seed_mix_ptr, hyper_ptr, prog_tensor_ptr, block_ids_ptr,
                         grad_scale_ptr,
                         P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                         K: tl.constexpr, INDEX_64: tl.constexpr, CHECK_EDGES: tl.constexpr,
                         EXACT_BF16: tl.constexpr, ALIGNED: tl.constexpr, STOCHASTIC: tl.constexpr,
                         SCALE_GRAD: tl.constexpr):
    # The tables are described in `launch`. block_ids holds K block ids per program, so that load does not wait for
    # the tables.
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    block_id = tl.load(block_ids_ptr + pid.to(tl.int64) * K + tl.arange(0, K))
    dyn = dyn_ptr + t * 6
    shape = shape_ptr + t * 8
    p_ptr = tl.load(dyn + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(dyn + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(dyn + 2).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(dyn + 3).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # Addresses cast from integers carry no alignment; without these hints every access is scalar.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)

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

    offs, state_offs, ok = _tile(shape, pid, block_id, BH, BW, TILE_H, TILE_W, K, INDEX_64, CHECK_EDGES, ALIGNED)
    if STOCHASTIC:  # bf16 params or states: one hash per element, its low half for p, its high half for v. Before
        # the loads, which it does not need: it runs while they are in flight.
        seed = _fmix32((tl.load(seed_mix_ptr + row) ^ tl.load(dyn + 4)).to(tl.uint32))  # reference.rounding_seed
        index = (tl.load(shape + 7) + offs).to(tl.uint32)  # flat index in the whole param, mod 2**32
        random = _hash32(index, seed)
    p = tl.load(p_ptr + offs, mask=ok).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    if SCALE_GRAD:  # clipping (SparseAdamW.clip_grad_norm_), applied as the gradient is read
        g = g * tl.load(grad_scale_ptr)
    m = tl.load(m_ptr + state_offs, mask=ok).to(tl.float32)
    v = tl.load(v_ptr + state_offs, mask=ok).to(tl.float32)

    p, m, v = _adamw(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bc2_sqrt)
    _store(m_ptr + state_offs, m, ok, S_DTYPE, EXACT_BF16)
    if STOCHASTIC and P_DTYPE == tl.bfloat16:
        _store_bf16_stochastic(p_ptr + offs, p, ok, random & 0xFFFF)
    else:
        _store(p_ptr + offs, p, ok, P_DTYPE, EXACT_BF16)
    if STOCHASTIC and S_DTYPE == tl.bfloat16:
        _store_bf16_stochastic(v_ptr + state_offs, v, ok, random >> 16)
    else:
        _store(v_ptr + state_offs, v, ok, S_DTYPE, EXACT_BF16)


@triton.jit
def _live_square_sum_kernel(shape_ptr, grad_ptrs_ptr, prog_tensor_ptr, block_ids_ptr, out_ptr,
                            G_DTYPE: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, TILE_H: tl.constexpr,
                            TILE_W: tl.constexpr, K: tl.constexpr, INDEX_64: tl.constexpr,
                            CHECK_EDGES: tl.constexpr, ALIGNED: tl.constexpr):
    # The step kernel's tiles, gradients only: each program writes the fp32 sum of squares of its K live blocks.
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    block_id = tl.load(block_ids_ptr + pid.to(tl.int64) * K + tl.arange(0, K))
    g_ptr = tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    offs, _, ok = _tile(shape_ptr + t * 8, pid, block_id, BH, BW, TILE_H, TILE_W, K, INDEX_64, CHECK_EDGES, ALIGNED)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g))


def launch_square_sum(shapes, grad_ptrs, prog_tensor, block_ids, out, *, grad_dtype, block, blocks_per_program,
                      index_64, check_edges, aligned, num_warps) -> None:
    """out[i] = the sum of squares, in fp32, of program i's live blocks of the gradients; `shapes`, `prog_tensor`
    and `block_ids` as for `launch`, grad_ptrs int64 (T,): each tensor's gradient address. Pruned blocks are not
    read, so NaN or inf there does not count."""
    bh, bw = block
    _live_square_sum_kernel[(prog_tensor.numel(),)](
        shapes, grad_ptrs, prog_tensor, block_ids, out, G_DTYPE=TL_DTYPES[grad_dtype], BH=bh, BW=bw,
        TILE_H=triton.next_power_of_2(bh), TILE_W=triton.next_power_of_2(bw), K=blocks_per_program,
        INDEX_64=index_64, CHECK_EDGES=check_edges, ALIGNED=aligned, num_warps=num_warps, enable_fp_fusion=True)


def launch(shapes, dyn, seed_mixes, hyper, prog_tensor, block_ids, grad_scale=None, *, param_dtype, grad_dtype,
           state_dtype, block, blocks_per_program, index_64, check_edges, aligned, stochastic, exact_bf16,
           num_warps) -> None:
    """One launch over the tables, all on the params' device:

    shapes      int64 (T, 8), per tensor t: rows, cols, numel, block columns, live blocks, first program, row shift
                (a row shard that starts mid-block), flat index of element 0 in the whole parameter
    dyn         int64 (T, 6), per tensor: param, grad, exp_avg, exp_avg_sq addresses, index mix
                (sparse_adamw.reference.index_mix of its position), its row r in `hyper` and `seed_mixes`
    seed_mixes  int64 (R,): the rounding seed's per-step part (sparse_adamw.reference.seed_mix) of row r
    hyper       fp32 (R, 8): row r's sparse_adamw.reference.StepConstants, its last, sqrt(1 - beta2^t), inverted: the
                kernel multiplies where the reference divides (within an ulp, like its fast sqrt and division).
                Dividing, even once per program, measured 4% slower in fp32 on an H200 (benchmarks/RESULTS.md)
    prog_tensor int32 (n_programs,): the tensor of each program; block_ids int32 (n_programs * K,): its live blocks
    grad_scale  None, or an fp32 tensor of one element that every gradient is multiplied by as it is read

    exact_bf16 rounds fp32 -> bf16 to nearest by hand (Triton's interpreter truncates); aligned promises 16-byte
    aligned addresses and column counts (vector loads).

    Multiply-adds contract into FMAs whatever Triton's default (which Triton 3.10 turns off): without them the
    fp32 step ran 9% slower on an H200, and its values differ from the reference's by an ulp either way (fast sqrt
    and division; tests/test_rounding.py, `_assert_rounded_alike`).
    """
    bh, bw = block
    _sparse_adamw_kernel[(prog_tensor.numel(),)](
        shapes, dyn, seed_mixes, hyper, prog_tensor, block_ids, hyper if grad_scale is None else grad_scale,
        P_DTYPE=TL_DTYPES[param_dtype], G_DTYPE=TL_DTYPES[grad_dtype], S_DTYPE=TL_DTYPES[state_dtype],
        BH=bh, BW=bw, TILE_H=triton.next_power_of_2(bh), TILE_W=triton.next_power_of_2(bw), K=blocks_per_program,
        INDEX_64=index_64, CHECK_EDGES=check_edges, EXACT_BF16=exact_bf16, ALIGNED=aligned, STOCHASTIC=stochastic,
        SCALE_GRAD=grad_scale is not None, num_warps=num_warps, enable_fp_fusion=True)
