// CPU kernel: the CUDA kernel's programs (K live blocks of one tensor each), split over threads by at::parallel_for.
// The inner loop runs over contiguous elements of one block row (of a whole block where rows are contiguous) with
// no branches, so the compiler vectorises it.
#include <algorithm>

#include <ATen/Parallel.h>

#include "sparse_adamw.h"

// The per-block function is compiled for AVX-512, AVX2 and baseline x86-64 and picked when the library loads: the
// baseline (SSE2) is compute-bound here, more so for bf16 (no 32-bit vector multiply for the hash).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_ADAMW_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARSE_ADAMW_CPU_CLONES
#endif

namespace sparse_adamw {
namespace {

// Always inlined: only then is it compiled (and vectorised) for each clone's instruction set.
template <typename P, typename G, typename S, bool STOCHASTIC>
C10_ALWAYS_INLINE void update_span(P* __restrict__ p, const G* __restrict__ g, S* __restrict__ m, S* __restrict__ v,
                                   int64_t n, const Hyper h, uint32_t index, uint32_t seed) {
  for (int64_t j = 0; j < n; ++j) {
    float pj = to_float(p[j]);
    float mj = to_float(m[j]);
    float vj = to_float(v[j]);
    adamw_update(pj, mj, vj, to_float(g[j]), h);
    if constexpr (STOCHASTIC) {  // one hash per element: its low half rounds p, its high half v
      const uint32_t random = hash32(index + static_cast<uint32_t>(j), seed);
      p[j] = from_float_stochastic<P>(pj, random & 0xFFFFu);
      v[j] = from_float_stochastic<S>(vj, random >> 16);
    } else {
      p[j] = from_float<P>(pj);
      v[j] = from_float<S>(vj);
    }
    m[j] = from_float<S>(mj);
  }
}

template <typename P, typename G, typename S, bool STOCHASTIC>
SPARSE_ADAMW_CPU_CLONES void update_block(const TensorArgs& t, int64_t slot, int64_t block_id, int64_t bh, int64_t bw) {
  auto* p = static_cast<P*>(t.param);
  auto* g = static_cast<const G*>(t.grad);
  auto* m = static_cast<S*>(t.exp_avg);
  auto* v = static_cast<S*>(t.exp_avg_sq);
  const int64_t row0 = block_id / t.n_block_cols * bh - t.row_shift;  // negative in a shard's first block row
  const int64_t col0 = block_id % t.n_block_cols * bw;
  const int64_t r0 = std::max<int64_t>(0, -row0);  // the block's rows from r0 to h lie in the tensor
  const int64_t h = std::min(bh, t.rows - row0);
  const int64_t w = std::min(bw, t.cols - col0);
  const int64_t slot0 = slot * bh * bw;
  // The hash counts elements of the whole parameter, modulo 2**32.
  const auto index = [&](int64_t off) { return static_cast<uint32_t>(t.index_base + off); };
  // Offsets past numel only occur in the last row of a param-shaped (unmasked) layout.
  if (t.cols == bw) {  // block rows are contiguous in the param as in the state: one span
    const int64_t off = (row0 + r0) * t.cols, s = slot0 + r0 * bw;
    const int64_t n = std::min((h - r0) * bw, t.numel - off);
    update_span<P, G, S, STOCHASTIC>(p + off, g + off, m + s, v + s, n, t.hyper, index(off), t.seed);
    return;
  }
  for (int64_t r = r0; r < h; ++r) {
    const int64_t off = (row0 + r) * t.cols + col0;
    const int64_t n = std::min(w, t.numel - off);
    if (n <= 0) {
      break;
    }
    const int64_t s = slot0 + r * bw;
    update_span<P, G, S, STOCHASTIC>(p + off, g + off, m + s, v + s, n, t.hyper, index(off), t.seed);
  }
}

template <typename P, typename G, typename S, bool STOCHASTIC>
void run(const std::vector<TensorArgs>& tensors, const int32_t* prog_tensor, const int32_t* block_ids,
         int64_t n_prog, const Launch& launch) {
  const int64_t k = launch.blocks_per_program, bh = launch.block_h, bw = launch.block_w;
  // About 64 Ki elements per task: thread start-up is amortised, and 2 threads still split a 1 M-element step.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (k * bh * bw));
  at::parallel_for(0, n_prog, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pid = begin; pid < end; ++pid) {
      const TensorArgs& t = tensors[prog_tensor[pid]];
      const int64_t slot0 = (pid - t.first_program) * k;
      const int64_t n_blocks = (t.row_shift + t.rows + bh - 1) / bh * t.n_block_cols;
      for (int64_t i = 0; i < std::min(k, t.n_live - slot0); ++i) {
        const int64_t block_id = block_ids[pid * k + i];
        TORCH_CHECK(block_id >= 0 && block_id < n_blocks, "sparse_adamw: block id ", block_id, " of program ", pid,
                    " is outside the tensor's ", n_blocks, " blocks");
        update_block<P, G, S, STOCHASTIC>(t, slot0 + i, block_id, bh, bw);
      }
    }
  });
}

}  // namespace

void step_cpu(const std::vector<TensorArgs>& tensors, const at::Tensor& prog_tensor, const at::Tensor& block_ids,
              const Launch& launch) {
  const int32_t* progs = prog_tensor.data_ptr<int32_t>();
  const int32_t* ids = block_ids.data_ptr<int32_t>();
  const int64_t n_prog = prog_tensor.numel();
  dispatch_dtypes(launch, [&](auto p_tag, auto g_tag, auto s_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using S = decltype(s_tag);
    if constexpr (std::is_same_v<P, c10::BFloat16> || std::is_same_v<S, c10::BFloat16>) {
      if (launch.stochastic) {
        return run<P, G, S, true>(tensors, progs, ids, n_prog, launch);
      }
    }
    run<P, G, S, false>(tensors, progs, ids, n_prog, launch);
  });
}

}  // namespace sparse_adamw
