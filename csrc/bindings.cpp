// The binding of sparse_adamw._C: checks every input, builds the per-tensor table and runs the CPU or CUDA kernel.
#include <cmath>
#include <limits>

#include <torch/extension.h>

#include "sparse_adamw.h"

namespace sparse_adamw {
namespace {

constexpr int64_t kInt32Limit = int64_t{1} << 31;

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), "sparse_adamw: ", name,
              " must be a contiguous ", dtype, " CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "sparse_adamw: ", name, " must have shape (",
              rows, ", ", cols, "), got ", t.sizes());
}

void check_tensor(const at::Tensor& t, const char* name, size_t i, const at::Device& device, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "sparse_adamw: ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, "sparse_adamw: ", name, "[", i, "] is on ", t.device(), ", params[0] on ",
              device);
  TORCH_CHECK(t.scalar_type() == dtype, "sparse_adamw: ", name, "[", i, "] is ", t.scalar_type(), "; one launch takes ",
              dtype, " for every ", name);
  TORCH_CHECK(t.is_contiguous(), "sparse_adamw: ", name, "[", i, "] must be contiguous");
}

// One row of sparse_adamw.reference.step_constants, computed in double by Python and rounded to fp32 once here.
Hyper hyper_row(const double* row, size_t i) {
  for (int k = 0; k < 8; ++k) {
    TORCH_CHECK(std::isfinite(row[k]), "sparse_adamw: step constant ", k, " of tensor ", i, " is ", row[k]);
  }
  Hyper h;
  h.decay = static_cast<float>(row[0]);
  h.beta1 = static_cast<float>(row[1]);
  h.one_minus_beta1 = static_cast<float>(row[2]);
  h.beta2 = static_cast<float>(row[3]);
  h.one_minus_beta2 = static_cast<float>(row[4]);
  h.eps = static_cast<float>(row[5]);
  h.step_size = static_cast<float>(row[6]);
  h.bc2_sqrt = static_cast<float>(row[7]);
  return h;
}

}  // namespace

// One step for params[i] with grads[i] and the compact states exp_avgs[i], exp_avg_sqs[i] (sparse_adamw/layout.py).
//   shapes       int64 CPU (T, 8): rows, cols, numel, block columns, live blocks, first program, row shift, index
//                base of each tensor (sparse_adamw.backends.LaunchPlan, the table the Triton kernel reads too)
//   hyper        float64 CPU (T, 8): each tensor's sparse_adamw.reference.StepConstants
//   seeds        int64 CPU (T,): stochastic rounding seeds of bf16 params and exp_avg_sq; empty: round to nearest
//   prog_tensor  int32 (n_prog,) on the params' device: the tensor of each program, in tensor order
//   block_ids    int32 (n_prog * blocks_per_program,): each program's live block ids (row-major), zero-padded
void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, const at::Tensor& shapes,
          const at::Tensor& hyper, const at::Tensor& seeds, const at::Tensor& prog_tensor, const at::Tensor& block_ids,
          int64_t block_h, int64_t block_w, int64_t blocks_per_program, int64_t threads, bool index_64) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "sparse_adamw: no tensors");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, "sparse_adamw: ", n,
              " params but ", grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(),
              " exp_avg_sqs");
  const int64_t t_count = static_cast<int64_t>(n);
  check_table(shapes, "shapes", at::kLong, t_count, 8);
  check_table(hyper, "hyper", at::kDouble, t_count, 8);
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1 &&
                  (seeds.numel() == 0 || seeds.numel() == t_count) && seeds.is_contiguous(),
              "sparse_adamw: seeds must be an int64 CPU tensor of ", t_count, " seeds or empty");
  TORCH_CHECK(block_h >= 1 && block_w >= 1 && blocks_per_program >= 1, "sparse_adamw: bad block shape (", block_h,
              ", ", block_w, ") or blocks per program ", blocks_per_program);

  Launch launch;
  launch.param_dtype = params[0].scalar_type();
  launch.grad_dtype = grads[0].scalar_type();
  launch.state_dtype = exp_avgs[0].scalar_type();
  launch.block_h = block_h;
  launch.block_w = block_w;
  launch.blocks_per_program = blocks_per_program;
  launch.stochastic = seeds.numel() > 0;
  launch.threads = threads;
  TORCH_CHECK(!launch.stochastic || launch.param_dtype == at::kBFloat16 || launch.state_dtype == at::kBFloat16,
              "sparse_adamw: stochastic rounding is for bfloat16 params or states, got ", launch.param_dtype,
              " params and ", launch.state_dtype, " states");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "sparse_adamw: params on ", device, " (CPU or CUDA only)");
  for (const auto* ids : {&prog_tensor, &block_ids}) {
    TORCH_CHECK(ids->device() == device && ids->scalar_type() == at::kInt && ids->dim() == 1 && ids->is_contiguous(),
                "sparse_adamw: prog_tensor and block_ids must be contiguous 1-D int32 tensors on ", device);
  }
  const int64_t n_prog = prog_tensor.numel();
  TORCH_CHECK(block_ids.numel() == n_prog * blocks_per_program, "sparse_adamw: ", n_prog, " programs of ",
              blocks_per_program, " blocks need ", n_prog * blocks_per_program, " block ids, got ", block_ids.numel());

  const int64_t* shape = shapes.data_ptr<int64_t>();
  const double* hyper_rows = hyper.data_ptr<double>();
  const int64_t* seed = seeds.data_ptr<int64_t>();
  std::vector<TensorArgs> tensors(n);
  int64_t first_program = 0;
  bool needs_64 = n_prog * blocks_per_program >= kInt32Limit;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    check_tensor(p, "params", i, device, launch.param_dtype);
    check_tensor(g, "grads", i, device, launch.grad_dtype);
    check_tensor(m, "exp_avgs", i, device, launch.state_dtype);
    check_tensor(v, "exp_avg_sqs", i, device, launch.state_dtype);
    const int64_t* row = shape + 8 * i;
    const int64_t rows = row[0], cols = row[1], numel = row[2], n_live = row[4], row_shift = row[6];
    const int64_t index_base = row[7];
    TORCH_CHECK(row_shift >= 0 && row_shift < block_h && index_base >= 0, "sparse_adamw: tensor ", i,
                " has row shift ", row_shift, " (0 to ", block_h - 1, ") and index base ", index_base);
    const int64_t n_block_cols = (cols + block_w - 1) / block_w;
    TORCH_CHECK(row[3] == n_block_cols && row[5] == first_program, "sparse_adamw: tensor ", i, " has ", row[3],
                " block columns and first program ", row[5], "; its shape and the tensors before it say ",
                n_block_cols, " and ", first_program);
    const int64_t n_blocks = (row_shift + rows + block_h - 1) / block_h * n_block_cols;
    TORCH_CHECK(rows >= 0 && cols >= 0 && n_live >= 0 && n_live <= n_blocks, "sparse_adamw: tensor ", i, " has ",
                n_live, " live blocks of ", n_blocks, " (rows ", rows, ", cols ", cols, ")");
    TORCH_CHECK(g.sizes() == p.sizes(), "sparse_adamw: grads[", i, "] has shape ", g.sizes(), ", params[", i, "] ",
                p.sizes());
    TORCH_CHECK(p.numel() == numel, "sparse_adamw: params[", i, "] has ", p.numel(), " elements, its layout ", numel);
    TORCH_CHECK(v.sizes() == m.sizes(), "sparse_adamw: exp_avg_sqs[", i, "] has shape ", v.sizes(), ", exp_avgs[", i,
                "] ", m.sizes());
    if (m.dim() == 3 && p.dim() == 2) {  // compact state: one (bh, bw) slot per live block of a (rows, cols) param
      TORCH_CHECK(p.size(0) == rows && p.size(1) == cols, "sparse_adamw: params[", i, "] has shape ", p.sizes(),
                  ", its layout (", rows, ", ", cols, ")");
      TORCH_CHECK(m.size(0) == n_live && m.size(1) == block_h && m.size(2) == block_w, "sparse_adamw: exp_avgs[", i,
                  "] has shape ", m.sizes(), "; compact state needs (", n_live, ", ", block_h, ", ", block_w, ")");
    } else {  // param-shaped state of an all-live param, seen as a (ceil(numel / bw), bw) matrix
      TORCH_CHECK(m.sizes() == p.sizes(), "sparse_adamw: exp_avgs[", i, "] has shape ", m.sizes(),
                  "; param-shaped state needs ", p.sizes());
      TORCH_CHECK(cols == block_w && rows == (numel + block_w - 1) / block_w && row_shift == 0 &&
                      n_live == (rows + block_h - 1) / block_h,
                  "sparse_adamw: tensor ", i, " with param-shaped state needs the all-live layout of ", numel,
                  " elements");
    }
    if (launch.stochastic) {
      TORCH_CHECK(seed[i] >= 0 && seed[i] <= int64_t{0xFFFFFFFF}, "sparse_adamw: seed ", seed[i], " is not 32-bit");
    }
    // Offsets reach past the last row and column in edge blocks, and past the last slot in the last program.
    needs_64 = needs_64 || (row_shift + rows + block_h) * (cols + block_w) >= kInt32Limit ||
               (n_live + blocks_per_program) * block_h * block_w >= kInt32Limit;
    tensors[i] = TensorArgs{p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), rows, cols, numel, n_block_cols,
                            n_live, row_shift, index_base, first_program, hyper_row(hyper_rows + 8 * i, i),
                            launch.stochastic ? static_cast<uint32_t>(seed[i]) : 0u};
    first_program += (n_live + blocks_per_program - 1) / blocks_per_program;
  }
  TORCH_CHECK(first_program == n_prog, "sparse_adamw: the tensors' live blocks need ", first_program,
              " programs, prog_tensor has ", n_prog);
  launch.index_64 = index_64 || needs_64;

  if (device.is_cpu()) {  // on the GPU the kernel skips programs whose table entries do not fit
    const int32_t* progs = prog_tensor.data_ptr<int32_t>();
    for (size_t i = 0; i < n; ++i) {
      const int64_t end = i + 1 < n ? tensors[i + 1].first_program : n_prog;
      for (int64_t pid = tensors[i].first_program; pid < end; ++pid) {
        TORCH_CHECK(progs[pid] == static_cast<int32_t>(i), "sparse_adamw: program ", pid, " belongs to tensor ", i,
                    ", prog_tensor says ", progs[pid]);
      }
    }
  }
  if (device.is_cuda()) {
#ifdef SPARSE_ADAMW_WITH_CUDA
    step_cuda(tensors, prog_tensor, block_ids, launch);
#else
    TORCH_CHECK(false, "sparse_adamw: this build of the extension has no CUDA kernel");
#endif
  } else {
    step_cpu(tensors, prog_tensor, block_ids, launch);
  }
}

}  // namespace sparse_adamw

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_adamw's C++/CUDA kernels: AdamW on the live blocks of many tensors in one call";
  m.def("step", &sparse_adamw::step, "One AdamW step on the live blocks of many tensors (see csrc/bindings.cpp)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("shapes"),
        py::arg("hyper"), py::arg("seeds"), py::arg("prog_tensor"), py::arg("block_ids"), py::arg("block_h"),
        py::arg("block_w"), py::arg("blocks_per_program"), py::arg("threads"), py::arg("index_64"));
#ifdef SPARSE_ADAMW_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
