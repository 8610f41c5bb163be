// Kernels behind the flowpert:: ops. Semantics (identical on CPU and CUDA, see philox.h for the
// counter layout):
//   gaussian        out[r, j] = N(0,1) draw of element j of row r, then optionally the per-row,
//                   per-Cartesian-component mean over particles is subtracted (mean-free).
//   directions      the same Gaussian rows g, returned as unit vectors u and norms r (g = u r);
//                   r is what Noise.chi draws (a sum in a fixed order: same bits on CPU and GPU).
//   uniform         out[i] in (0, 1).
//   partial_redraw  copy of w where k[r] distinct coordinates of row r, chosen uniformly by
//                   Floyd's algorithm, are replaced by their N(0,1) draw normal_at(r, c).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <tuple>

namespace flowpert {

struct Draw {  // the key of one call
  int64_t seed, stream, offset;
};

at::Tensor gaussian_cpu(int64_t rows, int64_t dim, int64_t n_particles, Draw d);
std::tuple<at::Tensor, at::Tensor> directions_cpu(int64_t rows, int64_t dim, int64_t n_particles, Draw d);
at::Tensor uniform_cpu(int64_t n, Draw d);
at::Tensor partial_redraw_cpu(const at::Tensor& w, const at::Tensor& k, Draw d);

#ifdef FLOWPERT_WITH_CUDA
at::Tensor gaussian_cuda(int64_t rows, int64_t dim, int64_t n_particles, Draw d, at::Device dev);
std::tuple<at::Tensor, at::Tensor> directions_cuda(int64_t rows, int64_t dim, int64_t n_particles, Draw d,
                                                   at::Device dev);
at::Tensor uniform_cuda(int64_t n, Draw d, at::Device dev);
at::Tensor partial_redraw_cuda(const at::Tensor& w, const at::Tensor& k, Draw d);
#endif

}  // namespace flowpert
