// CPU implementation of the APART perturbation primitives (module apart_fast._C_cpu).
//
// One pass over memory per op: the elementwise math of perturb_math.h in loops over `__restrict`
// pointers with the scalars passed by value (so the compiler can prove the stores alias nothing and
// vectorises them, `#pragma omp simd`), split across threads with at::parallel_for. The clamp-gradient
// convention and the presence of an optional input are template parameters, so the inner loops hold
// no branches. Backward writes every elementwise gradient and accumulates the step-size gradient in
// the same loop. Reductions accumulate in fp32 (fp64 for fp64 data) in fixed chunks of kChunk
// elements; chunk sums are added in order, so the result does not depend on the number of threads.
//
// Large outputs are fresh allocations whose first touch page-faults (4 KiB at a time: about as long
// as the op's own arithmetic); they are advised to use transparent huge pages before the kernel
// writes them (new_output), which cuts that cost several-fold. APART_FAST_CPU_THP=0 turns it off.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "perturb_checks.h"
#include "perturb_convention.h"
#include "perturb_math.h"

#if defined(_OPENMP)
#define APART_SIMD _Pragma("omp simd")
#define APART_SIMD_SUM _Pragma("omp simd reduction(+ : sum)")  // the loops name their accumulator `sum`
#else
#define APART_SIMD
#define APART_SIMD_SUM
#endif

namespace apart {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task for the elementwise ops
constexpr int64_t kChunk = 32768;  // elements per partial sum of a reduction
constexpr size_t kHugeMin = size_t(4) << 20;  // outputs from 4 MiB on are advised to use huge pages
constexpr uintptr_t kHuge = uintptr_t(2) << 20;  // the x86-64 transparent huge page size

bool g_at_bound = true;  // clamp passes the gradient at its bounds; measured at import (perturb_convention.h)

bool thp_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("APART_FAST_CPU_THP");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Ask the kernel for transparent huge pages over the 2 MiB-aligned interior of a fresh buffer, before
// its first touch. Advisory only: a failure (or a kernel without THP) leaves ordinary pages.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (nbytes < kHugeMin || !thp_enabled()) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + nbytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// An output laid out like `like` (dense, any memory format: empty_like keeps its strides), of `like`'s dtype
// unless given.
at::Tensor new_output(const at::Tensor& like, c10::optional<at::ScalarType> dtype = c10::nullopt) {
  auto t = at::empty_like(like, like.options().dtype(dtype.value_or(like.scalar_type())));
  advise_huge_pages(t);
  return t;
}

template <typename F>
void parallel_elementwise(int64_t n, const F& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// Sum over [0, n) of chunk(begin, end), the partial sum of one chunk (which also writes that chunk's
// elementwise outputs); chunks of kChunk elements run in parallel and are added in index order.
template <typename acc_t, typename F>
acc_t chunked_sum(int64_t n, const F& chunk) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<acc_t> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1)), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      partial[static_cast<size_t>(c)] = chunk(begin, end);
    }
  });
  acc_t total = acc_t(0);
  for (acc_t p : partial) total += p;
  return total;
}

template <typename acc_t>
acc_t step_value(const at::Tensor& a) {
  return static_cast<acc_t>(a.item<double>());  // CPU tensor: no device sync involved
}

#define APART_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " is on ", t.device(), "; the cpp backend takes CPU tensors (use cuda)");
}

// ---- inner loops: [begin, end) of one task, pointers restrict-qualified, scalars by value ----

template <typename scalar_t, typename acc_t, bool kR>
void init_fwd_loop(int64_t b, int64_t e, const scalar_t* __restrict x, const scalar_t* __restrict omega, acc_t a,
                   acc_t eps, scalar_t* __restrict x0, scalar_t* __restrict d0) {
  APART_SIMD
  for (int64_t i = b; i < e; ++i) init_fwd<scalar_t, acc_t, kR>(x[i], omega[i], a, eps, x0[i], d0[i]);
}

template <typename scalar_t, typename acc_t, bool kR, bool kAtBound, bool kHasGd>
acc_t init_bwd_loop(int64_t b, int64_t e, const scalar_t* __restrict gx0, const scalar_t* __restrict gd0,
                    const scalar_t* __restrict x, const scalar_t* __restrict omega, acc_t a, acc_t eps,
                    scalar_t* __restrict gx_out) {
  acc_t sum = acc_t(0);
  APART_SIMD_SUM
  for (int64_t i = b; i < e; ++i) {
    acc_t gx;
    const acc_t gd = kHasGd ? static_cast<acc_t>(gd0[i]) : acc_t(0);
    sum += init_bwd<scalar_t, acc_t, kR>(gx0[i], gd, x[i], omega[i], a, eps, kAtBound, gx);
    gx_out[i] = static_cast<scalar_t>(gx);
  }
  return sum;
}

template <typename scalar_t, typename acc_t, bool kR>
void step_fwd_loop(int64_t b, int64_t e, const scalar_t* __restrict x, const scalar_t* __restrict d,
                   const scalar_t* __restrict g, acc_t a, acc_t eps, scalar_t* __restrict x1,
                   scalar_t* __restrict d1) {
  APART_SIMD
  for (int64_t i = b; i < e; ++i) step_fwd<scalar_t, acc_t, kR>(x[i], d[i], sign<acc_t>(g[i]), a, eps, x1[i], d1[i]);
}

template <typename scalar_t, typename acc_t, bool kR, bool kAtBound, bool kHasGd>
acc_t step_bwd_loop(int64_t b, int64_t e, const scalar_t* __restrict gx1, const scalar_t* __restrict gd1,
                    const scalar_t* __restrict x, const scalar_t* __restrict d, const scalar_t* __restrict g,
                    acc_t a, acc_t eps, scalar_t* __restrict gx_out, scalar_t* __restrict gd_out) {
  acc_t sum = acc_t(0);
  APART_SIMD_SUM
  for (int64_t i = b; i < e; ++i) {
    acc_t gx, gd;
    const acc_t gdi = kHasGd ? static_cast<acc_t>(gd1[i]) : acc_t(0);
    sum += step_bwd<scalar_t, acc_t, kR>(gx1[i], gdi, x[i], d[i], sign<acc_t>(g[i]), a, eps, kAtBound, gx, gd);
    gx_out[i] = static_cast<scalar_t>(gx);
    gd_out[i] = static_cast<scalar_t>(gd);
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
void pack_sign_loop(int64_t b, int64_t e, const scalar_t* __restrict g, int8_t* __restrict s) {
  APART_SIMD
  for (int64_t i = b; i < e; ++i) s[i] = sign_i8<acc_t>(g[i]);
}

template <typename scalar_t, typename acc_t>
void layer_fwd_loop(int64_t b, int64_t e, const scalar_t* __restrict h, const int8_t* __restrict s, acc_t a,
                    scalar_t* __restrict out) {
  APART_SIMD
  for (int64_t i = b; i < e; ++i) out[i] = layer_fwd<scalar_t, acc_t>(h[i], static_cast<acc_t>(s[i]), a);
}

template <typename scalar_t, typename acc_t>
acc_t layer_bwd_loop(int64_t b, int64_t e, const scalar_t* __restrict g, const int8_t* __restrict s) {
  acc_t sum = acc_t(0);
  APART_SIMD_SUM
  for (int64_t i = b; i < e; ++i) sum += static_cast<acc_t>(g[i]) * static_cast<acc_t>(s[i]);
  return sum;
}

template <typename scalar_t, typename acc_t>
void pgd_loop(int64_t b, int64_t e, const scalar_t* __restrict x_adv, const scalar_t* __restrict x,
              const scalar_t* __restrict g, acc_t step, acc_t eps, scalar_t* __restrict out) {
  APART_SIMD
  for (int64_t i = b; i < e; ++i) out[i] = pgd<scalar_t, acc_t>(x_adv[i], x[i], sign<acc_t>(g[i]), step, eps);
}

// ---- primitives ----

std::tuple<at::Tensor, at::Tensor> perturb_init_fwd(const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cpu(x, "x");
  check_perturb_init_args(x, omega, a_init);
  auto x0 = new_output(x), d0 = new_output(x);
  const int64_t n = x.numel();
  const bool round = rounds_step(a_init, x);
  APART_DISPATCH(x.scalar_type(), "perturb_init_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = step_value<acc_t>(a_init), e = static_cast<acc_t>(clamp_bound(eps, x, round));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = omega.const_data_ptr<scalar_t>();
    scalar_t* x0p = x0.mutable_data_ptr<scalar_t>();
    scalar_t* d0p = d0.mutable_data_ptr<scalar_t>();
    with_bool(round, [&](auto kr) {
      parallel_elementwise(n, [=](int64_t b, int64_t end) {
        init_fwd_loop<scalar_t, acc_t, decltype(kr)::value>(b, end, xp, op, a, e, x0p, d0p);
      });
    });
  });
  return {x0, d0};
}

std::tuple<at::Tensor, at::Tensor> perturb_init_bwd(const at::Tensor& grad_x0, const c10::optional<at::Tensor>& grad_d0,
                                                   const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cpu(x, "x");
  const bool has_gd = check_perturb_init_bwd_args(grad_x0, grad_d0, x, omega, a_init);
  auto grad_x = new_output(x);
  auto grad_a = at::empty({1}, x.options().dtype(acc_dtype(x)));
  const int64_t n = x.numel();
  const bool round = rounds_step(a_init, x);
  APART_DISPATCH(x.scalar_type(), "perturb_init_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = step_value<acc_t>(a_init), e = static_cast<acc_t>(clamp_bound(eps, x, round));
    const scalar_t* gxp = grad_x0.const_data_ptr<scalar_t>();
    const scalar_t* gdp = has_gd ? grad_d0->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = omega.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    with_bool(round, [&](auto kr) {
      with_bool(g_at_bound, [&](auto at_bound) {
        with_bool(has_gd, [&](auto with_gd) {
          grad_a.fill_(chunked_sum<acc_t>(n, [=](int64_t b, int64_t end) {
            return init_bwd_loop<scalar_t, acc_t, decltype(kr)::value, decltype(at_bound)::value,
                                 decltype(with_gd)::value>(b, end, gxp, gdp, xp, op, a, e, out);
          }));
        });
      });
    });
  });
  return {grad_x, grad_a};
}

std::tuple<at::Tensor, at::Tensor> sign_step_fwd(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                                                const at::Tensor& a, double eps) {
  check_cpu(x, "x");
  check_sign_step_args(x, d, g, a);
  auto x1 = new_output(x), d1 = new_output(x);
  const int64_t n = x.numel();
  const bool round = rounds_step(a, x);
  APART_DISPATCH(x.scalar_type(), "sign_step_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a), e = static_cast<acc_t>(clamp_bound(eps, x, round));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* x1p = x1.mutable_data_ptr<scalar_t>();
    scalar_t* d1p = d1.mutable_data_ptr<scalar_t>();
    with_bool(round, [&](auto kr) {
      parallel_elementwise(n, [=](int64_t b, int64_t end) {
        step_fwd_loop<scalar_t, acc_t, decltype(kr)::value>(b, end, xp, dp, gp, av, e, x1p, d1p);
      });
    });
  });
  return {x1, d1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_step_bwd(const at::Tensor& grad_x1,
                                                            const c10::optional<at::Tensor>& grad_d1,
                                                            const at::Tensor& x, const at::Tensor& d,
                                                            const at::Tensor& g, const at::Tensor& a, double eps) {
  check_cpu(x, "x");
  const bool has_gd = check_sign_step_bwd_args(grad_x1, grad_d1, x, d, g, a);
  auto grad_x = new_output(x), grad_d = new_output(x);
  auto grad_a = at::empty({1}, x.options().dtype(acc_dtype(x)));
  const int64_t n = x.numel();
  const bool round = rounds_step(a, x);
  APART_DISPATCH(x.scalar_type(), "sign_step_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a), e = static_cast<acc_t>(clamp_bound(eps, x, round));
    const scalar_t* gxp = grad_x1.const_data_ptr<scalar_t>();
    const scalar_t* gdp = has_gd ? grad_d1->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* oxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* odp = grad_d.mutable_data_ptr<scalar_t>();
    with_bool(round, [&](auto kr) {
      with_bool(g_at_bound, [&](auto at_bound) {
        with_bool(has_gd, [&](auto with_gd) {
          grad_a.fill_(chunked_sum<acc_t>(n, [=](int64_t b, int64_t end) {
            return step_bwd_loop<scalar_t, acc_t, decltype(kr)::value, decltype(at_bound)::value,
                                 decltype(with_gd)::value>(b, end, gxp, gdp, xp, dp, gp, av, e, oxp, odp);
          }));
        });
      });
    });
  });
  return {grad_x, grad_d, grad_a};
}

at::Tensor pack_sign(const at::Tensor& g) {
  check_cpu(g, "g");
  check_float(g, "g");
  auto s = new_output(g, at::kChar);
  const int64_t n = g.numel();
  APART_DISPATCH(g.scalar_type(), "pack_sign", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    int8_t* sp = s.mutable_data_ptr<int8_t>();
    parallel_elementwise(n, [=](int64_t b, int64_t e) { pack_sign_loop<scalar_t, acc_t>(b, e, gp, sp); });
  });
  return s;
}

at::Tensor layer_perturb_fwd(const at::Tensor& h, const at::Tensor& s, const at::Tensor& a) {
  check_cpu(h, "h");
  check_float(h, "h");
  check_sign(s, h);
  check_step(a, "a", h);
  auto out = new_output(h);
  const int64_t n = h.numel();
  APART_DISPATCH(h.scalar_type(), "layer_perturb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const int8_t* sp = s.const_data_ptr<int8_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [=](int64_t b, int64_t e) { layer_fwd_loop<scalar_t, acc_t>(b, e, hp, sp, av, op); });
  });
  return out;
}

at::Tensor layer_perturb_bwd(const at::Tensor& grad_out, const at::Tensor& s) {
  check_cpu(grad_out, "grad_out");
  check_float(grad_out, "grad_out");
  check_sign(s, grad_out);
  auto grad_a = at::empty({1}, grad_out.options().dtype(acc_dtype(grad_out)));
  const int64_t n = grad_out.numel();
  APART_DISPATCH(grad_out.scalar_type(), "layer_perturb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const int8_t* sp = s.const_data_ptr<int8_t>();
    grad_a.fill_(chunked_sum<acc_t>(n, [=](int64_t b, int64_t e) { return layer_bwd_loop<scalar_t, acc_t>(b, e, gp, sp); }));
  });
  return grad_a;
}

at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& g, double step, double eps) {
  check_cpu(x, "x");
  check_pgd_args(x_adv, x, g);
  auto out = new_output(x);
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "pgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t st = static_cast<acc_t>(step), e = static_cast<acc_t>(scalar_bound(eps, x, true));
    const scalar_t* ap = x_adv.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [=](int64_t b, int64_t end) { pgd_loop<scalar_t, acc_t>(b, end, ap, xp, gp, st, e, op); });
  });
  return out;
}

// Bounds of every example's window, checked once on the host (CPU tensors: no sync involved).
void check_window_bounds(const WindowArgs& w, const at::Tensor& index, const at::Tensor& crop) {
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const int64_t* cp = crop.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < w.b; ++b) {
    TORCH_CHECK(ip[b] >= 0 && ip[b] < w.n, "index[", b, "] = ", ip[b], " is outside the store's ", w.n, " rows");
    TORCH_CHECK(cp[2 * b] >= 0 && cp[2 * b] + w.h <= w.hp && cp[2 * b + 1] >= 0 && cp[2 * b + 1] + w.w <= w.wp,
                "crop[", b, "] = (", cp[2 * b], ", ", cp[2 * b + 1], ") puts the ", w.h, "x", w.w,
                " window outside the store's ", w.hp, "x", w.wp, " frame");
  }
}

// Offset of image-frame element (b, c, i, j) in the store and in the frame tensor, through their strides.
struct WindowAt {
  int64_t store, frame;
};

inline WindowAt window_at(const WindowArgs& w, const int64_t* ip, const int64_t* cp, const bool* fp, int64_t b,
                          int64_t c, int64_t i, int64_t j) {
  const int64_t col = window_col(cp[2 * b + 1], j, w.w, fp[b]);
  return {ip[b] * w.ss[0] + c * w.ss[1] + (cp[2 * b] + i) * w.ss[2] + col * w.ss[3],
          b * w.fs[0] + c * w.fs[1] + i * w.fs[2] + j * w.fs[3]};
}

at::Tensor omega_gather(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                        const at::Tensor& flip, const at::Tensor& src, int64_t h, int64_t w) {
  check_cpu(store, "store");
  auto out = window_output(store, index.numel(), h, w);
  const WindowArgs wa = check_window(store, index, crop, flip, src, out);
  check_window_bounds(wa, index, crop);
  advise_huge_pages(out);
  APART_DISPATCH(store.scalar_type(), "omega_gather", [&] {
    const scalar_t* sp = store.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const int64_t* cp = crop.const_data_ptr<int64_t>();
    const bool* fp = flip.const_data_ptr<bool>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One task per (example, channel, row).
    at::parallel_for(0, wa.b * wa.c * h, std::max<int64_t>(1, kGrain / w), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const int64_t b = r / (wa.c * h), c = (r / h) % wa.c, i = r % h;
        for (int64_t j = 0; j < w; ++j) {
          const WindowAt at = window_at(wa, ip, cp, fp, b, c, i, j);
          op[at.frame] = sp[at.store];
        }
      }
    });
  });
  return out;
}

void omega_update(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop, const at::Tensor& flip,
                  const at::Tensor& src, const at::Tensor& g, const at::Tensor& ratio) {
  check_cpu(store, "store");
  const WindowArgs wa = check_window(store, index, crop, flip, src, g);
  TORCH_CHECK(g.scalar_type() == store.scalar_type(), "g has dtype ", g.scalar_type(), " but store has ",
              store.scalar_type(), "; cast g to the store's dtype");
  check_step(ratio, "ratio", store);
  check_window_bounds(wa, index, crop);
  const int64_t h = wa.h, w = wa.w;
  const bool round = rounds_step(ratio, store);
  APART_DISPATCH(store.scalar_type(), "omega_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t rv = step_value<acc_t>(ratio);
    scalar_t* sp = store.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const int64_t* cp = crop.const_data_ptr<int64_t>();
    const bool* fp = flip.const_data_ptr<bool>();
    const int64_t* srcp = src.const_data_ptr<int64_t>();
    // Only an example's first occurrence writes; distinct examples touch disjoint store rows.
    with_bool(round, [&](auto kr) {
      at::parallel_for(0, wa.b * wa.c * h, std::max<int64_t>(1, kGrain / w), [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const int64_t b = r / (wa.c * h), c = (r / h) % wa.c, i = r % h;
          if (srcp[b] != b) continue;
          for (int64_t j = 0; j < w; ++j) {
            const WindowAt at = window_at(wa, ip, cp, fp, b, c, i, j);
            scalar_t& o = sp[at.store];
            o = omega_new<scalar_t, acc_t, decltype(kr)::value>(o, sign<acc_t>(gp[at.frame]), rv);
          }
        }
      });
    });
  });
}

}  // namespace
}  // namespace apart

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace apart;
  m.doc() = "APART perturbation primitives, CPU (see apart_fast/ops/dispatch.py for the interface)";
  {
    py::gil_scoped_release no_gil;  // the autograd engine runs without the GIL
    g_at_bound = measure_clamp_grad_at_bound();
  }
  m.def("clamp_grad_passes_at_bound", [] { return g_at_bound; },
        "The installed torch's clamp-gradient convention at a bound, which the backward kernels follow");
  auto rel = py::call_guard<py::gil_scoped_release>();
  m.def("perturb_init_fwd", &perturb_init_fwd, rel);
  m.def("perturb_init_bwd", &perturb_init_bwd, rel);
  m.def("sign_step_fwd", &sign_step_fwd, rel);
  m.def("sign_step_bwd", &sign_step_bwd, rel);
  m.def("pack_sign", &pack_sign, rel);
  m.def("layer_perturb_fwd", &layer_perturb_fwd, rel);
  m.def("layer_perturb_bwd", &layer_perturb_bwd, rel);
  m.def("omega_gather", &omega_gather, rel);
  m.def("omega_update", &omega_update, rel);
  m.def("pgd_step", &pgd_step, rel);
}
