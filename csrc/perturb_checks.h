// Argument checks shared by the CPU and CUDA fronts. The Python dispatch layer already makes inputs
// contiguous and checks dtypes/devices with friendlier messages; these guard direct callers.
#pragma once

#include <ATen/ATen.h>

namespace apart {

inline void check_data(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ", like.device(),
              "; move both to one device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
              " has ", like.scalar_type(), "; cast one of them");
  TORCH_CHECK(t.numel() == like.numel(), name, " has ", t.numel(), " elements but ", like_name, " has ", like.numel(),
              "; pass tensors of one shape");
}

// A supported float dtype, contiguous: the first data argument of every primitive.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
              " has dtype ", st, "; supported: float32, float16, bfloat16, float64");
}

inline void check_step(const at::Tensor& a, const char* name, const at::Tensor& like) {
  TORCH_CHECK(a.numel() == 1, name, " must hold one element, got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, name, " has dtype ", a.scalar_type(),
              "; step sizes are float32 or float64");
  TORCH_CHECK(a.device() == like.device(), name, " is on ", a.device(), " but the data is on ", like.device(),
              "; move it to the data's device");
}

inline void check_sign(const at::Tensor& s, const at::Tensor& like) {
  TORCH_CHECK(s.scalar_type() == at::kChar, "s must be int8 (from pack_sign), got ", s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), "s must be contiguous");
  TORCH_CHECK(s.device() == like.device(), "s is on ", s.device(), " but h is on ", like.device());
  TORCH_CHECK(s.numel() == like.numel(), "s has ", s.numel(), " elements but h has ", like.numel());
}

// Per-op argument checks, shared by the CPU and CUDA entry points (each checks its device type first).
inline void check_perturb_init_args(const at::Tensor& x, const at::Tensor& omega, const at::Tensor& a_init) {
  check_float(x, "x");
  check_data(omega, "omega", x, "x");
  check_step(a_init, "a_init", x);
}

// Returns whether grad_d0 is given.
inline bool check_perturb_init_bwd_args(const at::Tensor& grad_x0, const c10::optional<at::Tensor>& grad_d0,
                                        const at::Tensor& x, const at::Tensor& omega, const at::Tensor& a_init) {
  check_perturb_init_args(x, omega, a_init);
  check_data(grad_x0, "grad_x0", x, "x");
  const bool has_gd = grad_d0.has_value() && grad_d0->defined();
  if (has_gd) check_data(*grad_d0, "grad_d0", x, "x");
  return has_gd;
}

inline void check_sign_step_args(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g, const at::Tensor& a) {
  check_float(x, "x");
  check_data(d, "d", x, "x");
  check_data(g, "g", x, "x");
  check_step(a, "a", x);
}

// Returns whether grad_d1 is given.
inline bool check_sign_step_bwd_args(const at::Tensor& grad_x1, const c10::optional<at::Tensor>& grad_d1,
                                     const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                                     const at::Tensor& a) {
  check_sign_step_args(x, d, g, a);
  check_data(grad_x1, "grad_x1", x, "x");
  const bool has_gd = grad_d1.has_value() && grad_d1->defined();
  if (has_gd) check_data(*grad_d1, "grad_d1", x, "x");
  return has_gd;
}

inline void check_pgd_args(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& g) {
  check_float(x, "x");
  check_data(x_adv, "x_adv", x, "x");
  check_data(g, "g", x, "x");
}

// The arithmetic dtype of a storage dtype: float64 stays float64, everything else computes in float32.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Step size as a one-element tensor of the arithmetic dtype (a no-op when it already is one).
inline at::Tensor step_as_acc(const at::Tensor& a, const at::Tensor& like) {
  return a.reshape({1}).to(acc_dtype(like)).contiguous();
}

struct WindowArgs {
  int64_t n, c, hp, wp, b, h, w;
};

inline WindowArgs check_window(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                               const at::Tensor& flip, const at::Tensor& src, int64_t h, int64_t w) {
  check_float(store, "store");
  TORCH_CHECK(store.dim() == 4 && store.is_contiguous(), "store must be a contiguous (N, C, H+2p, W+2p) tensor, got ",
              store.sizes());
  const int64_t b = index.numel();
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "index must be int64 of shape (B,), got ",
              index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(crop.dim() == 2 && crop.size(0) == b && crop.size(1) == 2 && crop.scalar_type() == at::kLong,
              "crop must be int64 of shape (", b, ", 2), got ", crop.scalar_type(), " ", crop.sizes());
  TORCH_CHECK(flip.numel() == b && flip.scalar_type() == at::kBool, "flip must be bool of shape (", b, ",), got ",
              flip.scalar_type(), " ", flip.sizes());
  TORCH_CHECK(src.numel() == b && src.scalar_type() == at::kLong, "src must be int64 of shape (", b, ",)");
  for (const at::Tensor* t : {&index, &crop, &flip, &src}) {
    TORCH_CHECK(t->device() == store.device(), "index/crop/flip/src must be on the store's device ", store.device());
    TORCH_CHECK(t->is_contiguous(), "index/crop/flip/src must be contiguous");
  }
  TORCH_CHECK(h >= 1 && w >= 1 && h <= store.size(2) && w <= store.size(3), "window ", h, "x", w,
              " does not fit the store's ", store.size(2), "x", store.size(3), " frame");
  return {store.size(0), store.size(1), store.size(2), store.size(3), b, h, w};
}

}  // namespace apart
