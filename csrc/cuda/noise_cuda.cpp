// Host side of the CUDA kernels, compiled by the host C++ compiler (no nvcc): the kernels come as
// NVRTC-compiled images embedded from the generated header, loaded with the CUDA 12 runtime's
// library API (cudaLibraryLoadData / cudaLibraryGetKernel) and launched with cudaLaunchKernel on
// torch's current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/types.h>

#include <mutex>

#include "flowpert_cuda_images.h"  // generated: cubins + PTX
#include "noise.h"
#include "philox.h"

namespace flowpert {
namespace {

#define FP_CUDA_CHECK(expr)                                                             \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    TORCH_CHECK(err_ == cudaSuccess, "flowpert CUDA: ", #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)

enum Kernel { K_GAUSSIAN, K_UNIFORM, K_REDRAW, K_COUNT };
const char* const kNames[K_COUNT] = {"fp_gaussian", "fp_uniform", "fp_partial_redraw"};
constexpr int kMaxDevices = 64;

struct Loaded {
  cudaLibrary_t lib = nullptr;
  cudaKernel_t fn[K_COUNT] = {};
};

// Kernels for one device: the cubin built for its exact architecture, else the PTX (JIT).
const Loaded& kernels_for(int device) {
  static Loaded loaded[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "flowpert CUDA: device index out of range");
  std::call_once(once[device], [device] {
    cudaDeviceProp prop;
    FP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    const int arch = 10 * prop.major + prop.minor;
    const void* image = flowpert_cuda_images::ptx;
    for (const auto& c : flowpert_cuda_images::cubins)
      if (c.arch == arch) image = c.data;
    TORCH_CHECK(image != flowpert_cuda_images::ptx || arch >= flowpert_cuda_images::ptx_arch,
                "flowpert CUDA: no kernel image for sm_", arch);
    Loaded& l = loaded[device];
    FP_CUDA_CHECK(cudaLibraryLoadData(&l.lib, image, nullptr, nullptr, 0, nullptr, nullptr, 0));
    for (int i = 0; i < K_COUNT; ++i) FP_CUDA_CHECK(cudaLibraryGetKernel(&l.fn[i], l.lib, kNames[i]));
  });
  return loaded[device];
}

void launch(int device, Kernel k, long long threads, int block, void** args) {
  if (threads == 0) return;
  const dim3 grid((unsigned)((threads + block - 1) / block)), blk((unsigned)block);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  FP_CUDA_CHECK(cudaLaunchKernel((const void*)kernels_for(device).fn[k], grid, blk, args, 0, stream));
}

struct KeyArgs {
  fp::u32 k0, k1, c2, c3;
  explicit KeyArgs(Draw d) {
    const fp::Key k = fp::make_key((fp::u64)d.seed, (fp::u64)d.stream, (fp::u64)d.offset);
    k0 = k.k0, k1 = k.k1, c2 = k.c2, c3 = k.c3;
  }
};

constexpr int kRowsPerBlock = 4;  // warp-per-row kernels: 128 threads

void fill_gaussian(at::Tensor& out, double* norms, long long rows, long long dim, long long np, Draw d) {
  KeyArgs key(d);
  double* y = out.data_ptr<double>();
  void* args[] = {&y, &norms, &rows, &dim, &np, &key.k0, &key.k1, &key.c2, &key.c3};
  launch(out.device().index(), K_GAUSSIAN, rows * 32, 32 * kRowsPerBlock, args);
}

}  // namespace

at::Tensor gaussian_cuda(int64_t rows, int64_t dim, int64_t n_particles, Draw d, at::Device dev) {
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({rows, dim}, at::TensorOptions().dtype(at::kDouble).device(dev));
  fill_gaussian(out, nullptr, rows, dim, n_particles, d);
  return out;
}

std::tuple<at::Tensor, at::Tensor> directions_cuda(int64_t rows, int64_t dim, int64_t n_particles, Draw d,
                                                   at::Device dev) {
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor u = at::empty({rows, dim}, at::TensorOptions().dtype(at::kDouble).device(dev));
  at::Tensor r = at::empty({rows}, u.options());
  fill_gaussian(u, r.data_ptr<double>(), rows, dim, n_particles, d);
  return {u, r};
}

at::Tensor uniform_cuda(int64_t n, Draw d, at::Device dev) {
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble).device(dev));
  KeyArgs key(d);
  double* o = out.data_ptr<double>();
  long long nn = n;
  void* args[] = {&o, &nn, &key.k0, &key.k1, &key.c2, &key.c3};
  launch(out.device().index(), K_UNIFORM, (n + 1) / 2, 256, args);
  return out;
}

at::Tensor partial_redraw_cuda(const at::Tensor& w, const at::Tensor& k, Draw d) {
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = w.to(at::kDouble).contiguous().clone();
  at::Tensor kk = k.to(at::kLong).contiguous();
  long long rows = w.size(0), dim = w.size(1), words = (dim + 31) / 32;
  at::Tensor taken = at::zeros({rows, words}, w.options().dtype(at::kInt));
  KeyArgs key(d);
  double* o = out.data_ptr<double>();
  const long long* kp = reinterpret_cast<const long long*>(kk.data_ptr<int64_t>());
  fp::u32* tp = reinterpret_cast<fp::u32*>(taken.data_ptr<int32_t>());
  void* args[] = {&o, &kp, &tp, &rows, &dim, &words, &key.k0, &key.k1, &key.c2, &key.c3};
  launch(w.device().index(), K_REDRAW, rows, 128, args);
  return out;
}

}  // namespace flowpert
