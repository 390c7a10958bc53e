// CUDA implementation of the APART perturbation primitives (bound in perturb_cuda_bind.cpp as apart_fast._C_cuda).
//
// Elementwise ops: one grid-stride kernel per op (map_kernel) with 16-byte vector loads/stores when
// every pointer is 16-byte aligned, the math from perturb_math.h. Step-size gradients: the same
// loop accumulating per thread in fp32 (fp64 for fp64 data), a warp-shuffle block reduction, one
// partial per block, and a final ATen sum over the (fixed-size) partials: deterministic, no atomics,
// no host sync. The step sizes stay on the device (read by the kernels), so the launches can be
// captured in a CUDA graph. The elementwise ops run over memory order, so any dense layout shared by
// their arguments works (perturb_checks.h); the omega kernels address the store and the image-frame
// tensor through their strides, one frame row per thread row (2-D blocks). Scalar bounds follow the reference
// on CUDA: clamp bounds in the clamped tensor's dtype, pgd_step's `x -+ eps` in fp32 (perturb_checks.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "perturb_checks.h"
#include "perturb_math.h"

namespace apart {
namespace cuda {
namespace {

constexpr int kThreads = 256;

bool g_at_bound = true;  // clamp passes the gradient at its bounds; set at import by the bindings

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, V>*>(p + i);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p + i) = v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  for (int64_t v = tid; v < nvec; v += stride) op.template run<V>(v * V);
  for (int64_t i = nvec * V + tid; i < n; i += stride) op.template run<1>(i);
}

template <int V, typename Op, typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Op op, int64_t n, acc_t* __restrict__ partial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  acc_t sum = acc_t(0);
  for (int64_t v = tid; v < nvec; v += stride) sum += op.template run<V>(v * V);
  for (int64_t i = nvec * V + tid; i < n; i += stride) sum += op.template run<1>(i);
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

int grid_for(int64_t work) {
  int sm_count = 0;  // the current device's (set by the caller's device guard); a cheap attribute query
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t sms = std::max(sm_count, 1);
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, sms * 8)));
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Elementwise launch: vector width kV when aligned (and the int8 side buffers allow it), else 1.
template <int kV, typename Op>
void launch_map(const Op& op, int64_t n, bool vec) {
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    map_kernel<kV><<<grid_for((n + kV - 1) / kV), kThreads, 0, stream>>>(op, n);
  } else {
    map_kernel<1><<<grid_for(n), kThreads, 0, stream>>>(op, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reduction launch: returns the one-element sum (acc dtype) of op's per-element terms.
template <int kV, typename acc_t, typename Op>
at::Tensor launch_reduce(const Op& op, int64_t n, bool vec, const at::TensorOptions& acc_opts) {
  if (n == 0) return at::zeros({1}, acc_opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int grid = vec ? grid_for((n + kV - 1) / kV) : grid_for(n);
  auto partial = at::empty({grid}, acc_opts);
  if (vec) {
    reduce_kernel<kV><<<grid, kThreads, 0, stream>>>(op, n, partial.mutable_data_ptr<acc_t>());
  } else {
    reduce_kernel<1><<<grid, kThreads, 0, stream>>>(op, n, partial.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum().reshape({1});
}

template <typename scalar_t>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// ---- ops ----

template <typename scalar_t, bool kR>
struct InitFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ omega;
  const acc_t* __restrict__ a;
  acc_t eps;
  scalar_t* __restrict__ x0;
  scalar_t* __restrict__ d0;
  template <int V>
  __device__ __forceinline__ void run(int64_t i) const {
    const acc_t av = *a;
    const auto xv = load<V>(x, i), ov = load<V>(omega, i);
    Pack<scalar_t, V> xo, dout;
#pragma unroll
    for (int k = 0; k < V; ++k) init_fwd<scalar_t, acc_t, kR>(xv.v[k], ov.v[k], av, eps, xo.v[k], dout.v[k]);
    store<V>(x0, i, xo);
    store<V>(d0, i, dout);
  }
};

template <typename scalar_t, bool kR>
struct InitBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ gx0;
  const scalar_t* __restrict__ gd0;  // may be null: no gradient flowed into d0
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ omega;
  const acc_t* __restrict__ a;
  acc_t eps;
  bool at_bound;
  scalar_t* __restrict__ gx;
  template <int V>
  __device__ __forceinline__ acc_t run(int64_t i) const {
    const acc_t av = *a;
    const auto gv = load<V>(gx0, i), xv = load<V>(x, i), ov = load<V>(omega, i);
    Pack<scalar_t, V> gd;
    if (gd0 != nullptr) {
      gd = load<V>(gd0, i);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) gd.v[k] = scalar_t(0);
    }
    Pack<scalar_t, V> out;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t g;
      sum += init_bwd<scalar_t, acc_t, kR>(gv.v[k], gd.v[k], xv.v[k], ov.v[k], av, eps, at_bound, g);
      out.v[k] = static_cast<scalar_t>(g);
    }
    store<V>(gx, i, out);
    return sum;
  }
};

template <typename scalar_t, bool kR>
struct StepFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ d;
  const scalar_t* __restrict__ g;
  const acc_t* __restrict__ a;
  acc_t eps;
  scalar_t* __restrict__ x1;
  scalar_t* __restrict__ d1;
  template <int V>
  __device__ __forceinline__ void run(int64_t i) const {
    const acc_t av = *a;
    const auto xv = load<V>(x, i), dv = load<V>(d, i), gv = load<V>(g, i);
    Pack<scalar_t, V> xo, dout;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      step_fwd<scalar_t, acc_t, kR>(xv.v[k], dv.v[k], sign<acc_t>(gv.v[k]), av, eps, xo.v[k], dout.v[k]);
    }
    store<V>(x1, i, xo);
    store<V>(d1, i, dout);
  }
};

template <typename scalar_t, bool kR>
struct StepBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ gx1;
  const scalar_t* __restrict__ gd1;  // may be null
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ d;
  const scalar_t* __restrict__ g;
  const acc_t* __restrict__ a;
  acc_t eps;
  bool at_bound;
  scalar_t* __restrict__ gx;
  scalar_t* __restrict__ gd;
  template <int V>
  __device__ __forceinline__ acc_t run(int64_t i) const {
    const acc_t av = *a;
    const auto gxv = load<V>(gx1, i), xv = load<V>(x, i), dv = load<V>(d, i), gv = load<V>(g, i);
    Pack<scalar_t, V> gdv;
    if (gd1 != nullptr) {
      gdv = load<V>(gd1, i);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) gdv.v[k] = scalar_t(0);
    }
    Pack<scalar_t, V> ox, od;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t rx, rd;
      sum += step_bwd<scalar_t, acc_t, kR>(gxv.v[k], gdv.v[k], xv.v[k], dv.v[k], sign<acc_t>(gv.v[k]), av, eps, at_bound,
                                        rx, rd);
      ox.v[k] = static_cast<scalar_t>(rx);
      od.v[k] = static_cast<scalar_t>(rd);
    }
    store<V>(gx, i, ox);
    store<V>(gd, i, od);
    return sum;
  }
};

template <typename scalar_t>
struct PackSign {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ g;
  int8_t* __restrict__ s;
  template <int V>
  __device__ __forceinline__ void run(int64_t i) const {
    const auto gv = load<V>(g, i);
    Pack<int8_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = sign_i8<acc_t>(gv.v[k]);
    store<V>(s, i, out);
  }
};

template <typename scalar_t>
struct LayerFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ h;
  const int8_t* __restrict__ s;
  const acc_t* __restrict__ a;
  scalar_t* __restrict__ out;
  template <int V>
  __device__ __forceinline__ void run(int64_t i) const {
    const acc_t av = *a;
    const auto hv = load<V>(h, i);
    const auto sv = load<V>(s, i);
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = layer_fwd<scalar_t, acc_t>(hv.v[k], static_cast<acc_t>(sv.v[k]), av);
    store<V>(out, i, o);
  }
};

template <typename scalar_t>
struct LayerBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ go;
  const int8_t* __restrict__ s;
  template <int V>
  __device__ __forceinline__ acc_t run(int64_t i) const {
    const auto gv = load<V>(go, i);
    const auto sv = load<V>(s, i);
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) sum += static_cast<acc_t>(gv.v[k]) * static_cast<acc_t>(sv.v[k]);
    return sum;
  }
};

template <typename scalar_t>
struct Pgd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ xa;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ g;
  acc_t step, eps;
  scalar_t* __restrict__ out;
  template <int V>
  __device__ __forceinline__ void run(int64_t i) const {
    const auto av = load<V>(xa, i), xv = load<V>(x, i), gv = load<V>(g, i);
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = pgd<scalar_t, acc_t>(av.v[k], xv.v[k], sign<acc_t>(gv.v[k]), step, eps);
    store<V>(out, i, o);
  }
};

// The omega kernels walk the (B, C, H, W) image frame by rows r = (b*C + c)*H + i (one per example, channel and
// window row) and columns j < W, on a 2-D block: threadIdx.x over columns, threadIdx.y over rows, blocks striding
// over rows. A row's example, channel and window offsets (64-bit divisions and the index/crop/flip reads) are
// worked out once per row, not per element; the column loop only adds strides.
struct WindowRow {
  int64_t b, store, frame, cx;
  bool flip;
};

__device__ __forceinline__ WindowRow window_row(const WindowArgs& w, const int64_t* __restrict__ index,
                                                const int64_t* __restrict__ crop, const bool* __restrict__ flip,
                                                int64_t r) {
  const int64_t i = r % w.h, bc = r / w.h, c = bc % w.c, b = bc / w.c;
  const int64_t row = index[b], cy = crop[2 * b], cx = crop[2 * b + 1];
  CUDA_KERNEL_ASSERT(row >= 0 && row < w.n && cy >= 0 && cy + w.h <= w.hp && cx >= 0 && cx + w.w <= w.wp);
  return {b, row * w.ss[0] + c * w.ss[1] + (cy + i) * w.ss[2], b * w.fs[0] + c * w.fs[1] + i * w.fs[2], cx, flip[b]};
}

// Threads of a window block: a whole number of warps over the columns (at most kThreads), the rest over rows.
dim3 window_block(int64_t width) {
  const int tx = static_cast<int>(std::min<int64_t>((width + 31) / 32 * 32, kThreads));
  return dim3(tx, kThreads / tx);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) omega_gather_kernel(
    const scalar_t* __restrict__ store, const int64_t* __restrict__ index, const int64_t* __restrict__ crop,
    const bool* __restrict__ flip, scalar_t* __restrict__ out, WindowArgs w) {
  const int64_t rows = w.b * w.c * w.h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const WindowRow at = window_row(w, index, crop, flip, r);
    for (int64_t j = threadIdx.x; j < w.w; j += blockDim.x) {
      out[at.frame + j * w.fs[3]] = store[at.store + window_col(at.cx, j, w.w, at.flip) * w.ss[3]];
    }
  }
}

template <typename scalar_t, bool kR>
__global__ void __launch_bounds__(kThreads) omega_update_kernel(
    scalar_t* __restrict__ store, const int64_t* __restrict__ index, const int64_t* __restrict__ crop,
    const bool* __restrict__ flip, const int64_t* __restrict__ src, const scalar_t* __restrict__ g,
    const at::opmath_type<scalar_t>* __restrict__ ratio, WindowArgs w) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t ratio_v = *ratio;
  const int64_t rows = w.b * w.c * w.h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t b = r / (w.h * w.c);
    if (src[b] != b) continue;  // a repeated example: its first occurrence writes
    const WindowRow at = window_row(w, index, crop, flip, r);
    for (int64_t j = threadIdx.x; j < w.w; j += blockDim.x) {
      scalar_t& v = store[at.store + window_col(at.cx, j, w.w, at.flip) * w.ss[3]];
      v = omega_new<scalar_t, acc_t, kR>(v, sign<acc_t>(static_cast<acc_t>(g[at.frame + j * w.fs[3]])), ratio_v);
    }
  }
}

#define APART_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " is on ", t.device(), "; the cuda backend takes CUDA tensors (use cpp)");
}

at::TensorOptions acc_options(const at::Tensor& like) { return like.options().dtype(acc_dtype(like)); }

}  // namespace

void set_clamp_grad_at_bound(bool at_bound) { g_at_bound = at_bound; }
bool clamp_grad_at_bound() { return g_at_bound; }

std::tuple<at::Tensor, at::Tensor> perturb_init_fwd(const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cuda(x, "x");
  check_perturb_init_args(x, omega, a_init);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x0 = at::empty_like(x), d0 = at::empty_like(x);
  const auto a = step_as_acc(a_init, x);
  const bool round = rounds_step(a_init, x);
  APART_DISPATCH(x.scalar_type(), "perturb_init_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(round, [&](auto kr) {
      InitFwd<scalar_t, decltype(kr)::value> op{
          x.const_data_ptr<scalar_t>(), omega.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
          static_cast<acc_t>(clamp_bound(eps, x, round)), x0.mutable_data_ptr<scalar_t>(),
          d0.mutable_data_ptr<scalar_t>()};
      launch_map<vec_of<scalar_t>()>(op, x.numel(), aligned16({op.x, op.omega, op.x0, op.d0}));
    });
  });
  return {x0, d0};
}

std::tuple<at::Tensor, at::Tensor> perturb_init_bwd(const at::Tensor& grad_x0, const c10::optional<at::Tensor>& grad_d0,
                                                   const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cuda(x, "x");
  const bool has_gd = check_perturb_init_bwd_args(grad_x0, grad_d0, x, omega, a_init);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  const auto a = step_as_acc(a_init, x);
  const bool round = rounds_step(a_init, x);
  at::Tensor grad_a;
  APART_DISPATCH(x.scalar_type(), "perturb_init_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(round, [&](auto kr) {
      InitBwd<scalar_t, decltype(kr)::value> op{
          grad_x0.const_data_ptr<scalar_t>(), has_gd ? grad_d0->const_data_ptr<scalar_t>() : nullptr,
          x.const_data_ptr<scalar_t>(), omega.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
          static_cast<acc_t>(clamp_bound(eps, x, round)), g_at_bound, grad_x.mutable_data_ptr<scalar_t>()};
      grad_a = launch_reduce<vec_of<scalar_t>(), acc_t>(
          op, x.numel(), aligned16({op.gx0, op.gd0, op.x, op.omega, op.gx}), acc_options(x));
    });
  });
  return {grad_x, grad_a};
}

std::tuple<at::Tensor, at::Tensor> sign_step_fwd(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                                                const at::Tensor& a, double eps) {
  check_cuda(x, "x");
  check_sign_step_args(x, d, g, a);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x1 = at::empty_like(x), d1 = at::empty_like(x);
  const auto av = step_as_acc(a, x);
  const bool round = rounds_step(a, x);
  APART_DISPATCH(x.scalar_type(), "sign_step_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(round, [&](auto kr) {
      StepFwd<scalar_t, decltype(kr)::value> op{
          x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          av.const_data_ptr<acc_t>(), static_cast<acc_t>(clamp_bound(eps, x, round)),
          x1.mutable_data_ptr<scalar_t>(), d1.mutable_data_ptr<scalar_t>()};
      launch_map<vec_of<scalar_t>()>(op, x.numel(), aligned16({op.x, op.d, op.g, op.x1, op.d1}));
    });
  });
  return {x1, d1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_step_bwd(const at::Tensor& grad_x1,
                                                            const c10::optional<at::Tensor>& grad_d1,
                                                            const at::Tensor& x, const at::Tensor& d,
                                                            const at::Tensor& g, const at::Tensor& a, double eps) {
  check_cuda(x, "x");
  const bool has_gd = check_sign_step_bwd_args(grad_x1, grad_d1, x, d, g, a);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x), grad_d = at::empty_like(x);
  const auto av = step_as_acc(a, x);
  const bool round = rounds_step(a, x);
  at::Tensor grad_a;
  APART_DISPATCH(x.scalar_type(), "sign_step_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(round, [&](auto kr) {
      StepBwd<scalar_t, decltype(kr)::value> op{
          grad_x1.const_data_ptr<scalar_t>(), has_gd ? grad_d1->const_data_ptr<scalar_t>() : nullptr,
          x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          av.const_data_ptr<acc_t>(), static_cast<acc_t>(clamp_bound(eps, x, round)), g_at_bound,
          grad_x.mutable_data_ptr<scalar_t>(), grad_d.mutable_data_ptr<scalar_t>()};
      grad_a = launch_reduce<vec_of<scalar_t>(), acc_t>(
          op, x.numel(), aligned16({op.gx1, op.gd1, op.x, op.d, op.g, op.gx, op.gd}), acc_options(x));
    });
  });
  return {grad_x, grad_d, grad_a};
}

at::Tensor pack_sign(const at::Tensor& g) {
  check_cuda(g, "g");
  check_float(g, "g");
  const c10::cuda::CUDAGuard guard(g.device());
  auto s = at::empty_like(g, g.options().dtype(at::kChar));
  APART_DISPATCH(g.scalar_type(), "pack_sign", [&] {
    constexpr int kV = vec_of<scalar_t>();
    PackSign<scalar_t> op{g.const_data_ptr<scalar_t>(), s.mutable_data_ptr<int8_t>()};
    launch_map<kV>(op, g.numel(), aligned16({op.g}) && reinterpret_cast<uintptr_t>(op.s) % kV == 0);
  });
  return s;
}

at::Tensor layer_perturb_fwd(const at::Tensor& h, const at::Tensor& s, const at::Tensor& a) {
  check_cuda(h, "h");
  check_float(h, "h");
  check_sign(s, h);
  check_step(a, "a", h);
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = at::empty_like(h);
  const auto av = step_as_acc(a, h);
  APART_DISPATCH(h.scalar_type(), "layer_perturb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kV = vec_of<scalar_t>();
    LayerFwd<scalar_t> op{h.const_data_ptr<scalar_t>(), s.const_data_ptr<int8_t>(), av.const_data_ptr<acc_t>(),
                          out.mutable_data_ptr<scalar_t>()};
    launch_map<kV>(op, h.numel(), aligned16({op.h, op.out}) && reinterpret_cast<uintptr_t>(op.s) % kV == 0);
  });
  return out;
}

at::Tensor layer_perturb_bwd(const at::Tensor& grad_out, const at::Tensor& s) {
  check_cuda(grad_out, "grad_out");
  check_float(grad_out, "grad_out");
  check_sign(s, grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad_a;
  APART_DISPATCH(grad_out.scalar_type(), "layer_perturb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kV = vec_of<scalar_t>();
    LayerBwd<scalar_t> op{grad_out.const_data_ptr<scalar_t>(), s.const_data_ptr<int8_t>()};
    grad_a = launch_reduce<kV, acc_t>(op, grad_out.numel(),
                                      aligned16({op.go}) && reinterpret_cast<uintptr_t>(op.s) % kV == 0,
                                      acc_options(grad_out));
  });
  return grad_a;
}

at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& g, double step, double eps) {
  check_cuda(x, "x");
  check_pgd_args(x_adv, x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  APART_DISPATCH(x.scalar_type(), "pgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Pgd<scalar_t> op{x_adv.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                     static_cast<acc_t>(step), static_cast<acc_t>(scalar_bound(eps, x, true)),
                     out.mutable_data_ptr<scalar_t>()};
    launch_map<vec_of<scalar_t>()>(op, x.numel(), aligned16({op.xa, op.x, op.g, op.out}));
  });
  return out;
}

at::Tensor omega_gather(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                        const at::Tensor& flip, const at::Tensor& src, int64_t h, int64_t w) {
  check_cuda(store, "store");
  const c10::cuda::CUDAGuard guard(store.device());
  auto out = window_output(store, index.numel(), h, w);
  const WindowArgs wa = check_window(store, index, crop, flip, src, out);
  if (out.numel() == 0) return out;
  const dim3 block = window_block(wa.w);
  const int grid = grid_for(wa.b * wa.c * wa.h * block.x);  // ceil(rows / block.y) blocks, capped like the others
  APART_DISPATCH(store.scalar_type(), "omega_gather", [&] {
    omega_gather_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        store.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), crop.const_data_ptr<int64_t>(),
        flip.const_data_ptr<bool>(), out.mutable_data_ptr<scalar_t>(), wa);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void omega_update(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop, const at::Tensor& flip,
                  const at::Tensor& src, const at::Tensor& g, const at::Tensor& ratio) {
  check_cuda(store, "store");
  const WindowArgs wa = check_window(store, index, crop, flip, src, g);
  TORCH_CHECK(g.scalar_type() == store.scalar_type(), "g has dtype ", g.scalar_type(), " but store has ",
              store.scalar_type(), "; cast g to the store's dtype");
  check_step(ratio, "ratio", store);
  const c10::cuda::CUDAGuard guard(store.device());
  const auto r = step_as_acc(ratio, store);
  const bool round = rounds_step(ratio, store);
  if (g.numel() == 0) return;
  const dim3 block = window_block(wa.w);
  const int grid = grid_for(wa.b * wa.c * wa.h * block.x);
  APART_DISPATCH(store.scalar_type(), "omega_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(round, [&](auto kr) {
      omega_update_kernel<scalar_t, decltype(kr)::value>
          <<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
              store.mutable_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), crop.const_data_ptr<int64_t>(),
              flip.const_data_ptr<bool>(), src.const_data_ptr<int64_t>(), g.const_data_ptr<scalar_t>(),
              r.const_data_ptr<acc_t>(), wa);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace apart
