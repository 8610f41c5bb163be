// CPU (OpenMP) kernels. Rows are distributed over threads; every value is a pure function of
// (key, row, element), so the output is bit-identical for any thread count.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "noise.h"
#include "philox.h"

namespace flowpert {
namespace {

using fp::u32;

// Below this many output elements the kernels run on one thread (no fork/join overhead).
constexpr int64_t kParallelGrain = 1 << 15;

int threads_for(int64_t work) { return work >= kParallelGrain ? at::get_num_threads() : 1; }

fp::Key key_of(Draw d) { return fp::make_key((fp::u64)d.seed, (fp::u64)d.stream, (fp::u64)d.offset); }

// One row of standard normals: element pair (2p, 2p+1) comes from Philox block p. Done in two
// passes over chunks of pairs (Philox -> uniforms, then Box-Muller) so that both loops vectorize;
// an AVX2 clone is picked at load time where available (same IEEE operations, same bits).
constexpr int kChunk = 256;

__attribute__((target_clones("avx2", "default")))
void normal_row(const fp::Key& k, u32 row, double* out, int64_t dim) {
  alignas(64) double u1[kChunk], u2[kChunk];
  const int64_t npair = dim / 2;
  for (int64_t p0 = 0; p0 < npair; p0 += kChunk) {
    const int n = (int)std::min<int64_t>(kChunk, npair - p0);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const fp::U4 b = fp::block(k, fp::DOM_NORMAL, (u32)(p0 + i), row);
      u1[i] = fp::uniform_open(b.x, b.y);
      u2[i] = fp::uniform_open(b.z, b.w);
    }
    double* o = out + 2 * p0;
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const double r = std::sqrt(-2.0 * fp::log_pos(u1[i]));
      double s, c;
      fp::sincos_2pi(u2[i], &s, &c);
      o[2 * i] = r * c;
      o[2 * i + 1] = r * s;
    }
  }
  if (dim & 1) out[dim - 1] = fp::normal_at(k, row, (u32)(dim - 1));
}

// y[idx[i]] = normal_at(row, idx[i]) for a list of element indices, vectorized like normal_row:
// element t is z0 (t even) or z1 (t odd) of Philox block t/2.
__attribute__((target_clones("avx2", "default")))
void normals_at(const fp::Key& k, u32 row, const u32* idx, int m, double* y) {
  alignas(64) double u1[kChunk], u2[kChunk], z[kChunk];
  for (int i0 = 0; i0 < m; i0 += kChunk) {
    const int n = std::min(kChunk, m - i0);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const fp::U4 b = fp::block(k, fp::DOM_NORMAL, idx[i0 + i] >> 1, row);
      u1[i] = fp::uniform_open(b.x, b.y);
      u2[i] = fp::uniform_open(b.z, b.w);
    }
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const double r = std::sqrt(-2.0 * fp::log_pos(u1[i]));
      double s, c;
      fp::sincos_2pi(u2[i], &s, &c);
      z[i] = (idx[i0 + i] & 1u) ? r * s : r * c;
    }
    for (int i = 0; i < n; ++i) y[idx[i0 + i]] = z[i];
  }
}

// Canonical summation order, shared with the CUDA kernels (one warp per row) so that both give
// the same bits: lane l = i mod 32 sums its terms in increasing i, then the 32 lane sums are
// combined by the tree acc[l] += acc[l + off] for off = 16, 8, 4, 2, 1.
template <class Term>
double lane_sum(int64_t n, Term term) {
  double acc[32] = {};
  int64_t i0 = 0;
  for (; i0 + 32 <= n; i0 += 32)
    for (int l = 0; l < 32; ++l) acc[l] += term(i0 + l);
  for (int64_t i = i0; i < n; ++i) acc[i - i0] += term(i);
  for (int off = 16; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) acc[l] += acc[l + off];
  return acc[0];
}

// Subtract the mean over particles of each Cartesian component (row = n particles x 3).
void remove_mean(double* y, int64_t n) {
  for (int c = 0; c < 3; ++c) {
    const double mean = lane_sum(n, [&](int64_t i) { return y[3 * i + c]; }) / (double)n;
    for (int64_t i = 0; i < n; ++i) y[3 * i + c] -= mean;
  }
}

void fill_gaussian(double* out, double* norms, int64_t rows, int64_t dim, int64_t n_particles, Draw d) {
  const fp::Key k = key_of(d);
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * dim))
  for (int64_t r = 0; r < rows; ++r) {
    double* y = out + r * dim;
    normal_row(k, (u32)r, y, dim);
    if (n_particles > 0) remove_mean(y, n_particles);
    if (norms) {  // directions: split g = u * |g|
      const double ss = lane_sum(dim, [&](int64_t j) { return y[j] * y[j]; });
      const double nr = std::sqrt(ss), inv = 1.0 / nr;
      for (int64_t j = 0; j < dim; ++j) y[j] *= inv;
      norms[r] = nr;
    }
  }
}

}  // namespace

at::Tensor gaussian_cpu(int64_t rows, int64_t dim, int64_t n_particles, Draw d) {
  at::Tensor out = at::empty({rows, dim}, at::TensorOptions().dtype(at::kDouble));
  fill_gaussian(out.data_ptr<double>(), nullptr, rows, dim, n_particles, d);
  return out;
}

std::tuple<at::Tensor, at::Tensor> directions_cpu(int64_t rows, int64_t dim, int64_t n_particles, Draw d) {
  at::Tensor u = at::empty({rows, dim}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor r = at::empty({rows}, at::TensorOptions().dtype(at::kDouble));
  fill_gaussian(u.data_ptr<double>(), r.data_ptr<double>(), rows, dim, n_particles, d);
  return {u, r};
}

at::Tensor uniform_cpu(int64_t n, Draw d) {
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const fp::Key k = key_of(d);
  const int64_t nblk = (n + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(n))
  for (int64_t p = 0; p < nblk; ++p) {
    fp::U4 b = fp::block(k, fp::DOM_UNIFORM, (u32)p, 0u);
    o[2 * p] = fp::uniform_open(b.x, b.y);
    if (2 * p + 1 < n) o[2 * p + 1] = fp::uniform_open(b.z, b.w);
  }
  return out;
}

at::Tensor partial_redraw_cpu(const at::Tensor& w_in, const at::Tensor& k_in, Draw d) {
  const int64_t B = w_in.size(0), D = w_in.size(1);
  at::Tensor w = w_in.to(at::kDouble).contiguous();
  at::Tensor kk = k_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, D}, w.options());
  const double* src = w.data_ptr<double>();
  double* dst = out.data_ptr<double>();
  const int64_t* kr = kk.data_ptr<int64_t>();
  const fp::Key key = key_of(d);
#pragma omp parallel num_threads(threads_for(B * D))
  {
    std::vector<unsigned char> taken(D, 0);  // membership mask of the chosen set, per thread
    std::vector<u32> chosen;
    chosen.reserve(64);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; ++r) {
      double* y = dst + r * D;
      std::memcpy(y, src + r * D, sizeof(double) * D);
      // Floyd's algorithm: a uniform k-subset of {0..D-1} in k steps. Step s = j - (D - k)
      // draws t uniform in [0, j] and takes t, or j if t is already taken.
      const u32 k = (u32)kr[r], n = (u32)D;
      fp::U4 b = {0, 0, 0, 0};
      chosen.clear();
      for (u32 s = 0; s < k; ++s) {
        const u32 j = n - k + s;
        if ((s & 1u) == 0) b = fp::block(key, fp::DOM_SELECT, s >> 1, (u32)r);
        u32 t = (s & 1u) ? fp::below(b.z, b.w, j + 1) : fp::below(b.x, b.y, j + 1);
        if (taken[t]) t = j;
        taken[t] = 1;
        chosen.push_back(t);
      }
      // The fresh value of coordinate t is its Gaussian draw normal_at(row, t): a function of the
      // chosen set only, not of the order Floyd's algorithm visits it in.
      normals_at(key, (u32)r, chosen.data(), (int)chosen.size(), y);
      for (u32 t : chosen) taken[t] = 0;
    }
  }
  return out;
}

}  // namespace flowpert
