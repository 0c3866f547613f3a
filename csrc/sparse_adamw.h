// Shared by the CPU kernel, the CUDA kernel and the binding: the per-tensor table row, the update math (once, for
// host and device) and the rounding of fp32 results to the storage dtypes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace sparse_adamw {

// fp32 constants of one tensor's step: sparse_adamw.reference.StepConstants (computed in double by Python, in that
// order), each rounded once, as the reference's scalars are, so that the arithmetic below is the reference's.
struct Hyper {
  float decay;  // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
};

// One row of the multi-tensor table. The kernels see every parameter as a (rows, cols) matrix of (bh, bw) blocks;
// states hold one (bh, bw) slot per live block (sparse_adamw/layout.py). A row shard (FSDP2) lies on the whole
// parameter's block grid: its first block row starts row_shift rows above it.
struct TensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  int64_t rows, cols, numel, n_block_cols, n_live;
  int64_t row_shift;
  int64_t index_base;     // flat index of element 0 in the whole parameter: stochastic rounding's counter
  int64_t first_program;  // programs (K live blocks each) before this tensor's in the launch
  Hyper hyper;
  uint32_t seed;  // stochastic rounding seed (bf16 params and exp_avg_sq)
};

// Launch-wide settings, checked by the binding.
struct Launch {
  at::ScalarType param_dtype, grad_dtype, state_dtype;
  int64_t block_h, block_w, blocks_per_program;
  bool stochastic;  // round bf16 params and exp_avg_sq stochastically with each tensor's seed
  bool index_64;    // 64-bit offsets in the CUDA kernel (chosen by size; forced by tests)
  int64_t threads;  // CUDA threads per program
};

// sparse_adamw.reference.adamw_math in fp32, in torch.optim.AdamW's order: its operations one by one (the build turns
// off contraction into FMA), so stochastic rounding sees the reference's fp32 bits.
C10_HOST_DEVICE inline void adamw_update(float& p, float& m, float& v, float g, const Hyper& h) {
  p = p * h.decay;
  m = h.beta1 * m + h.one_minus_beta1 * g;
  v = h.beta2 * v + h.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / h.bc2_sqrt + h.eps;
  p = p - h.step_size * (m / denom);
}

// murmur3's finaliser of (index, seed): the same 32 bits as sparse_adamw.reference.hash32.
C10_HOST_DEVICE inline uint32_t hash32(uint32_t index, uint32_t seed) {
  uint32_t h = (index * 0x9E3779B1u) ^ seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

C10_HOST_DEVICE inline float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// T -> fp32. bf16 from the bits by value: c10's conversion takes the value's address on the GPU, and then the
// compiler no longer knows that the kernel's loads are global (generic loads instead of LDG).
template <typename T>
C10_HOST_DEVICE inline float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_float(static_cast<uint32_t>(x.x) << 16);
  } else {
    return static_cast<float>(x);  // half: still generic loads on the GPU (a rare storage type there)
  }
}

// fp32 -> T, rounding to nearest even. Branch-free, so that the CPU loops vectorise.
template <typename T>
C10_HOST_DEVICE inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t bits = float_bits(x);
    bits = x != x ? 0x7FC00000u : bits + 0x7FFFu + ((bits >> 16) & 1u);  // NaN stays a quiet NaN
    return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "params are float, bfloat16 or half");
    return c10::Half(x);
  }
}

// fp32 -> T; a bf16 T rounds stochastically: add `random16` (16 random bits) below bf16's last mantissa bit and
// truncate (reference.round_to_bf16_stochastic). Other types round to nearest.
template <typename T>
C10_HOST_DEVICE inline T from_float_stochastic(float x, uint32_t random16) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(static_cast<uint16_t>((float_bits(x) + random16) >> 16), c10::BFloat16::from_bits());
  } else {
    return from_float<T>(x);
  }
}

// Calls f(P{}, G{}, S{}) with the storage types of a launch: fp32/bf16/fp16 params and grads, fp32/bf16 states.
template <typename F>
void dispatch_dtypes(const Launch& launch, F&& f) {
  auto grads = [&](auto p_tag) {
    auto states = [&](auto g_tag) {
      switch (launch.state_dtype) {
        case at::kFloat: return f(p_tag, g_tag, float{});
        case at::kBFloat16: return f(p_tag, g_tag, c10::BFloat16{});
        default: TORCH_CHECK(false, "sparse_adamw: states must be float32 or bfloat16, got ", launch.state_dtype);
      }
    };
    switch (launch.grad_dtype) {
      case at::kFloat: return states(float{});
      case at::kBFloat16: return states(c10::BFloat16{});
      case at::kHalf: return states(c10::Half{});
      default: TORCH_CHECK(false, "sparse_adamw: grads must be float32, bfloat16 or float16, got ", launch.grad_dtype);
    }
  };
  switch (launch.param_dtype) {
    case at::kFloat: return grads(float{});
    case at::kBFloat16: return grads(c10::BFloat16{});
    case at::kHalf: return grads(c10::Half{});
    default: TORCH_CHECK(false, "sparse_adamw: params must be float32, bfloat16 or float16, got ", launch.param_dtype);
  }
}

void step_cpu(const std::vector<TensorArgs>& tensors, const at::Tensor& prog_tensor, const at::Tensor& block_ids,
              const Launch& launch);
#ifdef SPARSE_ADAMW_WITH_CUDA
void step_cuda(const std::vector<TensorArgs>& tensors, const at::Tensor& prog_tensor, const at::Tensor& block_ids,
               const Launch& launch);
#endif

}  // namespace sparse_adamw
