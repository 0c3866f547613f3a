// CUDA kernel: one launch updates every live block of many tensors, as the Triton kernel does. Each CUDA block (a
// "program") updates K live blocks of one tensor; prog_tensor names the tensor, block_ids holds K live block ids
// per program, and a small table (one TensorArgs row per tensor, uploaded each step) holds addresses, shapes and
// the step's constants. Pruned blocks are in no program: nothing reads or writes them.
#include <algorithm>
#include <cstring>
#include <limits>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sparse_adamw.h"

namespace sparse_adamw {
namespace {

// VEC consecutive elements, loaded and stored as one vector access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// VEC > 1 only when every address, cols, bw and numel are multiples of VEC (checked at launch), so a group of VEC
// elements is either wholly inside the tensor or wholly outside.
template <typename P, typename G, typename S, typename index_t, int VEC>
__global__ void __launch_bounds__(1024) sparse_adamw_kernel(const TensorArgs* __restrict__ tensors,
                                                            const int32_t* __restrict__ prog_tensor,
                                                            const int32_t* __restrict__ block_ids, int bh, int bw,
                                                            int n_tensors, int k_blocks, bool stochastic) {
  const index_t pid = blockIdx.x;
  const int tensor = prog_tensor[pid];
  // Never true with tables from the binding; a bad table must not send a program to memory it does not own.
  if (tensor < 0 || tensor >= n_tensors) {
    return;
  }
  const TensorArgs& t = tensors[tensor];
  const index_t slot0 = (pid - static_cast<index_t>(t.first_program)) * k_blocks;  // this program's first slot
  if (slot0 < 0) {
    return;
  }
  const index_t rows = t.rows, cols = t.cols, numel = t.numel, n_block_cols = t.n_block_cols;
  const index_t row_shift = t.row_shift;
  const index_t n_blocks = (row_shift + rows + bh - 1) / bh * n_block_cols;
  const int groups_per_row = bw / VEC;
  const int groups_per_block = bh * groups_per_row;
  const index_t n_live_here = min(static_cast<index_t>(k_blocks), static_cast<index_t>(t.n_live) - slot0);
  const int n_groups = static_cast<int>(n_live_here) * groups_per_block;
  P* __restrict__ p_ptr = static_cast<P*>(t.param);
  const G* __restrict__ g_ptr = static_cast<const G*>(t.grad);
  S* __restrict__ m_ptr = static_cast<S*>(t.exp_avg);
  S* __restrict__ v_ptr = static_cast<S*>(t.exp_avg_sq);
  const Hyper hyper = t.hyper;

  for (int i = threadIdx.x; i < n_groups; i += blockDim.x) {
    const int k = i / groups_per_block;
    const int rem = i - k * groups_per_block;
    const int r = rem / groups_per_row;
    const int c = (rem - r * groups_per_row) * VEC;
    const index_t block_id = block_ids[pid * k_blocks + k];
    if (block_id < 0 || block_id >= n_blocks) {
      continue;  // as above
    }
    const index_t row = block_id / n_block_cols * bh + r - row_shift;  // negative above a shard's first row
    const index_t col = block_id % n_block_cols * bw + c;
    const index_t off = row * cols + col;
    if (row < 0 || row >= rows || col >= cols || off >= numel) {
      continue;  // outside a partial edge block or the shard
    }
    const index_t state_off = ((slot0 + k) * bh + r) * bw + c;

    const auto p_in = *reinterpret_cast<const Pack<P, VEC>*>(p_ptr + off);
    const auto g_in = *reinterpret_cast<const Pack<G, VEC>*>(g_ptr + off);
    const auto m_in = *reinterpret_cast<const Pack<S, VEC>*>(m_ptr + state_off);
    const auto v_in = *reinterpret_cast<const Pack<S, VEC>*>(v_ptr + state_off);
    Pack<P, VEC> p_out;
    Pack<S, VEC> m_out, v_out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float p = to_float(p_in.val[j]);
      float m = to_float(m_in.val[j]);
      float v = to_float(v_in.val[j]);
      adamw_update(p, m, v, to_float(g_in.val[j]), hyper);
      // Only bf16 rounds stochastically: without a bf16 P or S the compiler drops this branch.
      constexpr bool kAnyBf16 = std::is_same_v<P, c10::BFloat16> || std::is_same_v<S, c10::BFloat16>;
      if (kAnyBf16 && stochastic) {
        // The hash counts elements of the whole parameter modulo 2**32, as the reference and the Triton kernel do;
        // its low half rounds p, its high half v.
        const uint32_t random = hash32(static_cast<uint32_t>(t.index_base) + static_cast<uint32_t>(off + j), t.seed);
        p_out.val[j] = from_float_stochastic<P>(p, random & 0xFFFFu);
        v_out.val[j] = from_float_stochastic<S>(v, random >> 16);
      } else {
        p_out.val[j] = from_float<P>(p);
        v_out.val[j] = from_float<S>(v);
      }
      m_out.val[j] = from_float<S>(m);
    }
    *reinterpret_cast<Pack<P, VEC>*>(p_ptr + off) = p_out;
    *reinterpret_cast<Pack<S, VEC>*>(m_ptr + state_off) = m_out;
    *reinterpret_cast<Pack<S, VEC>*>(v_ptr + state_off) = v_out;
  }
}

template <typename P, typename G, typename S, typename index_t, int VEC>
void launch_kernel(const TensorArgs* tensors, int n_tensors, const at::Tensor& prog_tensor,
                   const at::Tensor& block_ids, const Launch& launch) {
  sparse_adamw_kernel<P, G, S, index_t, VEC>
      <<<static_cast<unsigned>(prog_tensor.numel()), static_cast<unsigned>(launch.threads), 0,
         c10::cuda::getCurrentCUDAStream()>>>(
          tensors, prog_tensor.data_ptr<int32_t>(), block_ids.data_ptr<int32_t>(),
          static_cast<int>(launch.block_h), static_cast<int>(launch.block_w), n_tensors,
          static_cast<int>(launch.blocks_per_program), launch.stochastic);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

void step_cuda(const std::vector<TensorArgs>& tensors, const at::Tensor& prog_tensor, const at::Tensor& block_ids,
               const Launch& launch) {
  const int64_t n_prog = prog_tensor.numel();
  if (n_prog == 0) {
    return;
  }
  TORCH_CHECK(n_prog <= std::numeric_limits<int32_t>::max(), "sparse_adamw: ", n_prog, " programs exceed the grid");
  TORCH_CHECK(launch.threads >= 32 && launch.threads <= 1024 && launch.threads % 32 == 0,
              "sparse_adamw: threads per program must be a multiple of 32 in [32, 1024], got ", launch.threads);
  TORCH_CHECK(launch.blocks_per_program * launch.block_h * launch.block_w <= std::numeric_limits<int32_t>::max(),
              "sparse_adamw: blocks_per_program * block size overflows the kernel's int32 group counter");
  const c10::cuda::CUDAGuard guard(prog_tensor.device());

  // The table goes up through pinned memory on the current stream; the caching host allocator keeps the buffer
  // until the copy has completed.
  const int64_t bytes = static_cast<int64_t>(tensors.size() * sizeof(TensorArgs));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tensors.data(), bytes);
  const at::Tensor table = host.to(prog_tensor.device(), /*non_blocking=*/true);
  const auto* table_ptr = reinterpret_cast<const TensorArgs*>(table.data_ptr());
  const int n_tensors = static_cast<int>(tensors.size());

  dispatch_dtypes(launch, [&](auto p_tag, auto g_tag, auto s_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using S = decltype(s_tag);
    // 16-byte accesses of the param; the other arrays take the same number of elements.
    constexpr int VEC = 16 / sizeof(P);
    bool vec = launch.block_w % VEC == 0;
    for (const TensorArgs& t : tensors) {
      vec = vec && t.cols % VEC == 0 && t.numel % VEC == 0 && aligned(t.param, VEC * sizeof(P)) &&
            aligned(t.grad, VEC * sizeof(G)) && aligned(t.exp_avg, VEC * sizeof(S)) &&
            aligned(t.exp_avg_sq, VEC * sizeof(S));
    }
    if (launch.index_64) {
      return vec ? launch_kernel<P, G, S, int64_t, VEC>(table_ptr, n_tensors, prog_tensor, block_ids, launch)
                 : launch_kernel<P, G, S, int64_t, 1>(table_ptr, n_tensors, prog_tensor, block_ids, launch);
    }
    vec ? launch_kernel<P, G, S, int32_t, VEC>(table_ptr, n_tensors, prog_tensor, block_ids, launch)
        : launch_kernel<P, G, S, int32_t, 1>(table_ptr, n_tensors, prog_tensor, block_ids, launch);
  });
}

}  // namespace sparse_adamw
