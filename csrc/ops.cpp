// Registers the flowpert:: ops with the dispatcher.
//
// Factory ops (no tensor inputs) take an optional device and pick the CPU or CUDA kernel
// themselves; partial_redraw (a tensor input) is registered per backend. All ops are
// non-differentiable noise: an Autograd fallthrough keeps them silent inside autograd (openmm-torch
// evaluates models with gradients on). Callers: openmm_flowpert/noise/_native.py (Noise draws on
// the CPU or, for Noise(device="cuda"), on the GPU); _philox is the known-answer test hook.
#include <torch/library.h>
#include <torch/types.h>

#include <optional>

#include "noise.h"
#include "philox.h"

namespace flowpert {
namespace {

constexpr int64_t kMaxRowLen = int64_t(1) << 31;  // element index must fit in 31 bits (pairs in 30)
constexpr int64_t kMaxRows = int64_t(1) << 32;    // row index is one 32-bit counter word

bool on_cuda(const std::optional<at::Device>& dev) { return dev.has_value() && dev->is_cuda(); }

[[noreturn]] [[maybe_unused]] void no_cuda() {
  TORCH_CHECK(false, "flowpert ops: this build has no CUDA kernels (rebuild with FLOWPERT_CUDA=1)");
}

void check_shape(int64_t rows, int64_t dim, int64_t n_particles) {
  TORCH_CHECK(rows >= 0 && rows < kMaxRows, "flowpert: rows must lie in [0, 2^32), got ", rows);
  TORCH_CHECK(dim >= 0 && dim < kMaxRowLen, "flowpert: dim must lie in [0, 2^31), got ", dim);
  TORCH_CHECK(n_particles >= 0, "flowpert: n_particles must be >= 0");
  TORCH_CHECK(n_particles == 0 || dim == 3 * n_particles, "flowpert: dim (", dim,
              ") must equal 3 * n_particles (", n_particles, ") for mean-free noise");
}

at::Tensor gaussian(int64_t rows, int64_t dim, int64_t n_particles, int64_t seed, int64_t stream, int64_t offset,
                    std::optional<at::Device> device) {
  check_shape(rows, dim, n_particles);
  const Draw d{seed, stream, offset};
#ifdef FLOWPERT_WITH_CUDA
  if (on_cuda(device)) return gaussian_cuda(rows, dim, n_particles, d, *device);
#else
  if (on_cuda(device)) no_cuda();
#endif
  return gaussian_cpu(rows, dim, n_particles, d);
}

std::tuple<at::Tensor, at::Tensor> directions(int64_t rows, int64_t dim, int64_t n_particles, int64_t seed,
                                              int64_t stream, int64_t offset, std::optional<at::Device> device) {
  check_shape(rows, dim, n_particles);
  const Draw d{seed, stream, offset};
#ifdef FLOWPERT_WITH_CUDA
  if (on_cuda(device)) return directions_cuda(rows, dim, n_particles, d, *device);
#else
  if (on_cuda(device)) no_cuda();
#endif
  return directions_cpu(rows, dim, n_particles, d);
}

at::Tensor uniform(int64_t n, int64_t seed, int64_t stream, int64_t offset, std::optional<at::Device> device) {
  TORCH_CHECK(n >= 0 && n < kMaxRowLen, "flowpert: n must lie in [0, 2^31), got ", n);
  const Draw d{seed, stream, offset};
#ifdef FLOWPERT_WITH_CUDA
  if (on_cuda(device)) return uniform_cuda(n, d, *device);
#else
  if (on_cuda(device)) no_cuda();
#endif
  return uniform_cpu(n, d);
}

void check_redraw(const at::Tensor& w, const at::Tensor& k) {
  TORCH_CHECK(w.dim() == 2, "flowpert.partial_redraw: w must be (B, D)");
  TORCH_CHECK(w.is_floating_point(), "flowpert.partial_redraw: w must be floating point");
  TORCH_CHECK(k.dim() == 1 && k.size(0) == w.size(0), "flowpert.partial_redraw: k must be (B,)");
  TORCH_CHECK(!k.is_floating_point() && !k.is_complex(), "flowpert.partial_redraw: k must be integer");
  TORCH_CHECK(w.size(0) < kMaxRows && w.size(1) < kMaxRowLen, "flowpert.partial_redraw: w too large");
  if (k.numel() > 0) {
    TORCH_CHECK(k.min().item<int64_t>() >= 0 && k.max().item<int64_t>() <= w.size(1),
                "flowpert.partial_redraw: k must lie in [0, D]");
  }
}

at::Tensor partial_redraw_cpu_op(const at::Tensor& w, const at::Tensor& k, int64_t seed, int64_t stream,
                                 int64_t offset) {
  check_redraw(w, k);
  return partial_redraw_cpu(w, k.cpu(), Draw{seed, stream, offset});
}

#ifdef FLOWPERT_WITH_CUDA
at::Tensor partial_redraw_cuda_op(const at::Tensor& w, const at::Tensor& k, int64_t seed, int64_t stream,
                                  int64_t offset) {
  check_redraw(w, k);
  return partial_redraw_cuda(w, k.to(w.device()), Draw{seed, stream, offset});
}
#endif

// Raw Philox4x32-10 blocks for known-answer tests: ctr (n, 4) int64 words -> (n, 4) int64 words.
at::Tensor philox_raw(const at::Tensor& ctr_in, int64_t k0, int64_t k1) {
  TORCH_CHECK(ctr_in.dim() == 2 && ctr_in.size(1) == 4, "flowpert._philox: ctr must be (n, 4)");
  at::Tensor ctr = ctr_in.to(at::kLong).contiguous().cpu();
  at::Tensor out = at::empty_like(ctr);
  const int64_t* c = ctr.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < ctr.size(0); ++i) {
    const int64_t* ci = c + 4 * i;
    fp::U4 b = fp::philox((fp::u32)ci[0], (fp::u32)ci[1], (fp::u32)ci[2], (fp::u32)ci[3], (fp::u32)k0, (fp::u32)k1);
    o[4 * i] = b.x, o[4 * i + 1] = b.y, o[4 * i + 2] = b.z, o[4 * i + 3] = b.w;
  }
  return out;
}

bool has_cuda() {
#ifdef FLOWPERT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace flowpert

TORCH_LIBRARY(flowpert, m) {
  m.def("gaussian(int rows, int dim, int n_particles, int seed, int stream, int offset, Device? device=None) -> Tensor");
  m.def("directions(int rows, int dim, int n_particles, int seed, int stream, int offset, Device? device=None)"
        " -> (Tensor, Tensor)");
  m.def("uniform(int n, int seed, int stream, int offset, Device? device=None) -> Tensor");
  m.def("partial_redraw(Tensor w, Tensor k, int seed, int stream, int offset) -> Tensor");
  m.def("_philox(Tensor ctr, int k0, int k1) -> Tensor");
  m.def("has_cuda() -> bool", &flowpert::has_cuda);
}

// Factory ops have no tensor to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(flowpert, CompositeExplicitAutograd, m) {
  m.impl("gaussian", &flowpert::gaussian);
  m.impl("directions", &flowpert::directions);
  m.impl("uniform", &flowpert::uniform);
}

TORCH_LIBRARY_IMPL(flowpert, CPU, m) {
  m.impl("partial_redraw", &flowpert::partial_redraw_cpu_op);
  m.impl("_philox", &flowpert::philox_raw);
}

#ifdef FLOWPERT_WITH_CUDA
TORCH_LIBRARY_IMPL(flowpert, CUDA, m) {
  m.impl("partial_redraw", &flowpert::partial_redraw_cuda_op);
}
#endif

TORCH_LIBRARY_IMPL(flowpert, Autograd, m) {
  for (const char* op : {"gaussian", "directions", "uniform", "partial_redraw", "_philox"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}
