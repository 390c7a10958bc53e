// CPU implementation of the APART perturbation primitives (module apart_fast._C_cpu).
//
// One pass over memory per op: the elementwise math of perturb_math.h in plain loops over contiguous
// pointers (the compiler vectorises the fp32/fp64 ones), split across threads with at::parallel_for.
// Reductions (the step-size gradients) accumulate in fp32 (fp64 for fp64 data) in fixed chunks of
// kChunk elements, each with kLanes independent partial sums; chunk sums are added in order, so the
// result does not depend on the number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "perturb_checks.h"
#include "perturb_convention.h"
#include "perturb_math.h"

namespace apart {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task for the elementwise ops
constexpr int64_t kChunk = 32768;  // elements per partial sum of a reduction
constexpr int kLanes = 8;          // independent accumulators inside a chunk (vector width)

bool g_at_bound = true;  // clamp passes the gradient at its bounds; measured at import (perturb_convention.h)

template <typename F>
void parallel_elementwise(int64_t n, const F& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// Sum of term(i) over [0, n), also running term's side effects (the elementwise outputs) exactly once per i.
template <typename acc_t, typename F>
acc_t chunked_sum(int64_t n, const F& term) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<acc_t> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1)), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      acc_t lanes[kLanes] = {};
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) lanes[k] += term(i + k);
      }
      for (; i < end; ++i) lanes[0] += term(i);
      acc_t s = acc_t(0);
      for (int k = 0; k < kLanes; ++k) s += lanes[k];
      partial[static_cast<size_t>(c)] = s;
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

std::tuple<at::Tensor, at::Tensor> perturb_init_fwd(const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  check_data(x, "x", x, "x");
  check_data(omega, "omega", x, "x");
  check_step(a_init, "a_init", x);
  auto x0 = at::empty_like(x), d0 = at::empty_like(x);
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "perturb_init_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = step_value<acc_t>(a_init), e = static_cast<acc_t>(eps);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = omega.const_data_ptr<scalar_t>();
    scalar_t* x0p = x0.mutable_data_ptr<scalar_t>();
    scalar_t* d0p = d0.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [&](int64_t b, int64_t e_) {
      for (int64_t i = b; i < e_; ++i) init_fwd<scalar_t, acc_t>(xp[i], op[i], a, e, x0p[i], d0p[i]);
    });
  });
  return {x0, d0};
}

std::tuple<at::Tensor, at::Tensor> perturb_init_bwd(const at::Tensor& grad_x0, const c10::optional<at::Tensor>& grad_d0,
                                                   const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  check_data(omega, "omega", x, "x");
  check_data(grad_x0, "grad_x0", x, "x");
  const bool has_gd = grad_d0.has_value() && grad_d0->defined();
  if (has_gd) check_data(*grad_d0, "grad_d0", x, "x");
  check_step(a_init, "a_init", x);
  auto grad_x = at::empty_like(x);
  auto grad_a = at::empty({1}, x.options().dtype(acc_dtype(x)));
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "perturb_init_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = step_value<acc_t>(a_init), e = static_cast<acc_t>(eps);
    const bool at_bound = g_at_bound;
    const scalar_t* gxp = grad_x0.const_data_ptr<scalar_t>();
    const scalar_t* gdp = has_gd ? grad_d0->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = omega.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    auto term = [&](int64_t i) -> acc_t {
      acc_t gx;
      const acc_t gd = gdp ? static_cast<acc_t>(gdp[i]) : acc_t(0);
      const acc_t r = init_bwd<scalar_t, acc_t>(gxp[i], gd, xp[i], op[i], a, e, at_bound, gx);
      out[i] = static_cast<scalar_t>(gx);
      return r;
    };
    grad_a.fill_(chunked_sum<acc_t>(n, term));
  });
  return {grad_x, grad_a};
}

std::tuple<at::Tensor, at::Tensor> sign_step_fwd(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                                                const at::Tensor& a, double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  check_data(d, "d", x, "x");
  check_data(g, "g", x, "x");
  check_step(a, "a", x);
  auto x1 = at::empty_like(x), d1 = at::empty_like(x);
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "sign_step_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a), e = static_cast<acc_t>(eps);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* x1p = x1.mutable_data_ptr<scalar_t>();
    scalar_t* d1p = d1.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [&](int64_t b, int64_t e_) {
      for (int64_t i = b; i < e_; ++i) {
        step_fwd<scalar_t, acc_t>(xp[i], dp[i], sign<acc_t>(gp[i]), av, e, x1p[i], d1p[i]);
      }
    });
  });
  return {x1, d1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_step_bwd(const at::Tensor& grad_x1,
                                                            const c10::optional<at::Tensor>& grad_d1,
                                                            const at::Tensor& x, const at::Tensor& d,
                                                            const at::Tensor& g, const at::Tensor& a, double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  check_data(d, "d", x, "x");
  check_data(g, "g", x, "x");
  check_data(grad_x1, "grad_x1", x, "x");
  const bool has_gd = grad_d1.has_value() && grad_d1->defined();
  if (has_gd) check_data(*grad_d1, "grad_d1", x, "x");
  check_step(a, "a", x);
  auto grad_x = at::empty_like(x), grad_d = at::empty_like(x);
  auto grad_a = at::empty({1}, x.options().dtype(acc_dtype(x)));
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "sign_step_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a), e = static_cast<acc_t>(eps);
    const bool at_bound = g_at_bound;
    const scalar_t* gxp = grad_x1.const_data_ptr<scalar_t>();
    const scalar_t* gdp = has_gd ? grad_d1->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* oxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* odp = grad_d.mutable_data_ptr<scalar_t>();
    auto term = [&](int64_t i) -> acc_t {
      acc_t gx, gdd;
      const acc_t gd = gdp ? static_cast<acc_t>(gdp[i]) : acc_t(0);
      const acc_t r = step_bwd<scalar_t, acc_t>(gxp[i], gd, xp[i], dp[i], sign<acc_t>(gp[i]), av, e, at_bound, gx, gdd);
      oxp[i] = static_cast<scalar_t>(gx);
      odp[i] = static_cast<scalar_t>(gdd);
      return r;
    };
    grad_a.fill_(chunked_sum<acc_t>(n, term));
  });
  return {grad_x, grad_d, grad_a};
}

at::Tensor pack_sign(const at::Tensor& g) {
  check_cpu(g, "g");
  check_float(g, "g");
  TORCH_CHECK(g.is_contiguous(), "g must be contiguous");
  auto s = at::empty_like(g, g.options().dtype(at::kChar));
  const int64_t n = g.numel();
  APART_DISPATCH(g.scalar_type(), "pack_sign", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    int8_t* sp = s.mutable_data_ptr<int8_t>();
    parallel_elementwise(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sp[i] = sign_i8<acc_t>(gp[i]);
    });
  });
  return s;
}

at::Tensor layer_perturb_fwd(const at::Tensor& h, const at::Tensor& s, const at::Tensor& a) {
  check_cpu(h, "h");
  check_float(h, "h");
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  check_sign(s, h);
  check_step(a, "a", h);
  auto out = at::empty_like(h);
  const int64_t n = h.numel();
  APART_DISPATCH(h.scalar_type(), "layer_perturb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = step_value<acc_t>(a);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const int8_t* sp = s.const_data_ptr<int8_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) op[i] = layer_fwd<scalar_t, acc_t>(hp[i], static_cast<acc_t>(sp[i]), av);
    });
  });
  return out;
}

at::Tensor layer_perturb_bwd(const at::Tensor& grad_out, const at::Tensor& s) {
  check_cpu(grad_out, "grad_out");
  check_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.is_contiguous(), "grad_out must be contiguous");
  check_sign(s, grad_out);
  auto grad_a = at::empty({1}, grad_out.options().dtype(acc_dtype(grad_out)));
  const int64_t n = grad_out.numel();
  APART_DISPATCH(grad_out.scalar_type(), "layer_perturb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const int8_t* sp = s.const_data_ptr<int8_t>();
    grad_a.fill_(chunked_sum<acc_t>(n, [&](int64_t i) { return static_cast<acc_t>(gp[i]) * static_cast<acc_t>(sp[i]); }));
  });
  return grad_a;
}

at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& g, double step, double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  check_data(x_adv, "x_adv", x, "x");
  check_data(g, "g", x, "x");
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  APART_DISPATCH(x.scalar_type(), "pgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t st = static_cast<acc_t>(step), e = static_cast<acc_t>(eps);
    const scalar_t* ap = x_adv.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_elementwise(n, [&](int64_t b, int64_t e_) {
      for (int64_t i = b; i < e_; ++i) op[i] = pgd<scalar_t, acc_t>(ap[i], xp[i], sign<acc_t>(gp[i]), st, e);
    });
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

at::Tensor omega_gather(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                        const at::Tensor& flip, const at::Tensor& src, int64_t h, int64_t w) {
  check_cpu(store, "store");
  const WindowArgs wa = check_window(store, index, crop, flip, src, h, w);
  check_window_bounds(wa, index, crop);
  auto out = at::empty({wa.b, wa.c, h, w}, store.options());
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
        const scalar_t* row = sp + ((ip[b] * wa.c + c) * wa.hp + cp[2 * b] + i) * wa.wp;
        scalar_t* orow = op + r * w;
        for (int64_t j = 0; j < w; ++j) orow[j] = row[window_col(cp[2 * b + 1], j, w, fp[b])];
      }
    });
  });
  return out;
}

void omega_update(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop, const at::Tensor& flip,
                  const at::Tensor& src, const at::Tensor& g, const at::Tensor& ratio) {
  check_cpu(store, "store");
  const WindowArgs wa = check_window(store, index, crop, flip, src, 1, 1);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == wa.b && g.size(1) == wa.c, "g must have shape (", wa.b, ", ", wa.c,
              ", H, W), got ", g.sizes());
  check_window(store, index, crop, flip, src, g.size(2), g.size(3));
  TORCH_CHECK(g.scalar_type() == store.scalar_type(), "g has dtype ", g.scalar_type(), " but store has ",
              store.scalar_type(), "; cast g to the store's dtype");
  TORCH_CHECK(g.is_contiguous() && g.device() == store.device(), "g must be contiguous and on the store's device");
  check_step(ratio, "ratio", store);
  const int64_t h = g.size(2), w = g.size(3);
  WindowArgs wb = wa;
  wb.h = h;
  wb.w = w;
  check_window_bounds(wb, index, crop);
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
    at::parallel_for(0, wa.b * wa.c * h, std::max<int64_t>(1, kGrain / w), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const int64_t b = r / (wa.c * h), c = (r / h) % wa.c, i = r % h;
        if (srcp[b] != b) continue;
        scalar_t* row = sp + ((ip[b] * wa.c + c) * wa.hp + cp[2 * b] + i) * wa.wp;
        const scalar_t* grow = gp + r * w;
        for (int64_t j = 0; j < w; ++j) {
          scalar_t& o = row[window_col(cp[2 * b + 1], j, w, fp[b])];
          o = omega_new<scalar_t, acc_t>(o, sign<acc_t>(grow[j]), rv);
        }
      }
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
