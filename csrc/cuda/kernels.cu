// CUDA kernels, compiled at build time by NVRTC (csrc/cuda/nvrtc_embed.cpp) into cubins that are
// embedded in libflowpert_ops.so. Same Philox counters, same arithmetic (no FMA contraction:
// --fmad=false) and the same summation order as csrc/noise_cpu.cpp, so the draws are the same bits
// as on the CPU. Rows are handled by one warp each: lane l takes pairs/elements l, l+32, ...
#include "philox.h"

using fp::u32;

#define FULL_MASK 0xFFFFFFFFu

// The canonical lane-then-tree sum (see lane_sum in noise_cpu.cpp); the result is in lane 0.
__device__ __forceinline__ double warp_tree(double s) {
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(FULL_MASK, s, off);
  return s;
}

__device__ __forceinline__ fp::Key make(u32 k0, u32 k1, u32 c2, u32 c3) {
  fp::Key k;
  k.k0 = k0, k.k1 = k1, k.c2 = c2, k.c3 = c3;
  return k;
}

// Gaussian rows (optionally mean-free over n_particles, optionally split into unit directions
// and norms when norms != nullptr). blockDim.x = 32 * rows per block.
extern "C" __global__ void fp_gaussian(double* out, double* norms, long long rows, long long dim,
                                       long long n_particles, u32 k0, u32 k1, u32 c2, u32 c3) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const fp::Key k = make(k0, k1, c2, c3);
  double* y = out + row * dim;
  const long long npair = (dim + 1) >> 1;
  for (long long p = lane; p < npair; p += 32) {
    double z0, z1;
    fp::box_muller(fp::block(k, fp::DOM_NORMAL, (u32)p, (u32)row), &z0, &z1);
    y[2 * p] = z0;
    if (2 * p + 1 < dim) y[2 * p + 1] = z1;
  }
  __syncwarp();
  if (n_particles > 0) {
    for (int c = 0; c < 3; ++c) {
      double s = 0.0;
      for (long long i = lane; i < n_particles; i += 32) s += y[3 * i + c];
      const double mean = __shfl_sync(FULL_MASK, warp_tree(s), 0) / (double)n_particles;
      for (long long i = lane; i < n_particles; i += 32) y[3 * i + c] -= mean;
      __syncwarp();
    }
  }
  if (norms != nullptr) {
    double s = 0.0;
    for (long long j = lane; j < dim; j += 32) s += y[j] * y[j];
    const double nr = sqrt(__shfl_sync(FULL_MASK, warp_tree(s), 0)), inv = 1.0 / nr;
    for (long long j = lane; j < dim; j += 32) y[j] *= inv;
    if (lane == 0) norms[row] = nr;
  }
}

extern "C" __global__ void fp_uniform(double* out, long long n, u32 k0, u32 k1, u32 c2, u32 c3) {
  const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (2 * p >= n) return;
  const fp::U4 b = fp::block(make(k0, k1, c2, c3), fp::DOM_UNIFORM, (u32)p, 0u);
  out[2 * p] = fp::uniform_open(b.x, b.y);
  if (2 * p + 1 < n) out[2 * p + 1] = fp::uniform_open(b.z, b.w);
}

// Floyd's algorithm, one thread per row, on a copy of w already in out. taken is a zeroed bitmap
// of words_per_row 32-bit words per row.
extern "C" __global__ void fp_partial_redraw(double* out, const long long* kk, u32* taken, long long rows,
                                             long long dim, long long words_per_row, u32 k0, u32 k1, u32 c2,
                                             u32 c3) {
  const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const fp::Key key = make(k0, k1, c2, c3);
  double* y = out + row * dim;
  u32* mask = taken + row * words_per_row;
  const u32 k = (u32)kk[row], n = (u32)dim;
  fp::U4 b = {0, 0, 0, 0};
  for (u32 s = 0; s < k; ++s) {
    const u32 j = n - k + s;
    if ((s & 1u) == 0) b = fp::block(key, fp::DOM_SELECT, s >> 1, (u32)row);
    u32 t = (s & 1u) ? fp::below(b.z, b.w, j + 1) : fp::below(b.x, b.y, j + 1);
    if (mask[t >> 5] & (1u << (t & 31))) t = j;
    mask[t >> 5] |= 1u << (t & 31);
    y[t] = fp::normal_at(key, (u32)row, t);
  }
}
