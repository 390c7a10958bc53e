// Argument checks and host-side conventions shared by the CPU and CUDA fronts. The Python dispatch layer
// already gives the tensors of one op one memory layout and checks dtypes/devices with friendlier
// messages; these guard direct callers.
//
// Layout: the elementwise ops run over the elements in memory order, so they take tensors in any memory
// format (NCHW, channels_last, a permutation) as long as each is non-overlapping and dense and all of
// them lay their elements out alike (same strides, up to the strides of size-1 dimensions, which never
// move). Outputs are allocated with empty_like and so keep that layout.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace apart {

// Whether `t` and `like` have one shape and address their elements alike (strides of size-1 dims ignored).
inline bool same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

inline void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " with strides ", t.strides(),
              " is not dense; pass a dense tensor (any memory format), e.g. ", name, ".contiguous()");
}

inline void check_data(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ", like.device(),
              "; move both to one device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
              " has ", like.scalar_type(), "; cast one of them");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), " but ", like_name, " has ", like.sizes(),
              "; pass tensors of one shape");
  TORCH_CHECK(same_layout(t, like), name, " has strides ", t.strides(), " but ", like_name, " has ", like.strides(),
              "; pass tensors of one memory format (e.g. ", name, " = torch.empty_like(", like_name, ").copy_(", name, "))");
}

// A supported float dtype, dense: the first data argument of every primitive.
inline void check_float(const at::Tensor& t, const char* name) {
  check_dense(t, name);
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
  TORCH_CHECK(s.device() == like.device(), "s is on ", s.device(), " but h is on ", like.device());
  TORCH_CHECK(s.sizes() == like.sizes() && same_layout(s, like), "s has shape ", s.sizes(), " and strides ",
              s.strides(), " but h has ", like.sizes(), " and ", like.strides(), "; pass the sign in h's memory format");
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

// Whether the reference computes with the step size `a` in the data's dtype (the kRoundStep of
// perturb_math.h): a 0-d step size with fp16/bf16 data. A (1,)-shaped one is promoted to fp32 instead.
inline bool rounds_step(const at::Tensor& a, const at::Tensor& data) {
  const auto st = data.scalar_type();
  return a.dim() == 0 && (st == at::kHalf || st == at::kBFloat16);
}

// `v` in the arithmetic type, rounded first to `data`'s fp16/bf16 dtype when `round` (fp32 otherwise; fp64 exact).
inline double rounded_scalar(double v, const at::Tensor& data, bool round) {
  const auto st = data.scalar_type();
  if (st == at::kDouble) return v;
  const float f = static_cast<float>(v);
  if (round && st == at::kHalf) return static_cast<float>(static_cast<at::Half>(f));
  if (round && st == at::kBFloat16) return static_cast<float>(static_cast<at::BFloat16>(f));
  return f;
}

// pgd_step's Python-scalar eps in `x -+ eps` as the reference's kernels on `data`'s device see it: PyTorch's CPU
// arithmetic kernels cast a scalar operand to the tensor's dtype (`round`: that tensor is fp16/bf16), its CUDA
// kernels read it in the opmath type (fp32) unrounded.
inline double scalar_bound(double v, const at::Tensor& data, bool round) {
  return rounded_scalar(v, data, round && data.device().is_cpu());
}

// perturb_init's and sign_step's clamp bound eps, the same on every device: rounded to the data's dtype where the
// clamped value is a tensor of that dtype (`round`: rounds_step). The forward output is the same with either bound
// (the clamped value is rounded to that dtype afterwards), and autograd's clamp mask compares the value with the
// Python-scalar bound in the value's dtype on the CPU and on CUDA alike (CUDA's compare kernels cast the scalar to
// the tensor's dtype; only its clamp kernel keeps fp32), so the backward masks match only with the rounded bound.
inline double clamp_bound(double v, const at::Tensor& data, bool round) { return rounded_scalar(v, data, round); }

// Calls fn(std::integral_constant<bool, b>) for a runtime b: the branch leaves the kernels' inner loops.
template <typename F>
void with_bool(bool b, const F& fn) {
  if (b) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Sizes of the store (n, c, hp, wp), of the window (b, h, w), and the element strides of the store (ss)
// and of the (B, C, H, W) image-frame tensor (fs: the gathered output or the update's g). Both may be in
// any memory format: the kernels address every element through these strides.
struct WindowArgs {
  int64_t n, c, hp, wp, b, h, w;
  int64_t ss[4];
  int64_t fs[4];
};

// `frame` is the (B, C, H, W) tensor the window is gathered into or read from (its strides are taken).
inline WindowArgs check_window(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                               const at::Tensor& flip, const at::Tensor& src, const at::Tensor& frame) {
  check_float(store, "store");
  TORCH_CHECK(store.dim() == 4, "store must be a dense (N, C, H+2p, W+2p) tensor, got shape ", store.sizes());
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
  TORCH_CHECK(frame.dim() == 4 && frame.size(0) == b && frame.size(1) == store.size(1), "the image-frame tensor must "
              "have shape (", b, ", ", store.size(1), ", H, W), got ", frame.sizes());
  TORCH_CHECK(frame.device() == store.device(), "g is on ", frame.device(), " but store is on ", store.device());
  const int64_t h = frame.size(2), w = frame.size(3);
  TORCH_CHECK(h >= 1 && w >= 1 && h <= store.size(2) && w <= store.size(3), "window ", h, "x", w,
              " does not fit the store's ", store.size(2), "x", store.size(3), " frame");
  WindowArgs wa{store.size(0), store.size(1), store.size(2), store.size(3), b, h, w, {}, {}};
  for (int d = 0; d < 4; ++d) {
    wa.ss[d] = store.stride(d);
    wa.fs[d] = frame.stride(d);
  }
  return wa;
}

// The (B, C, h, w) output of omega_gather, in the store's memory format.
inline at::Tensor window_output(const at::Tensor& store, int64_t b, int64_t h, int64_t w) {
  TORCH_CHECK(store.dim() == 4, "store must be a dense (N, C, H+2p, W+2p) tensor, got shape ", store.sizes());
  TORCH_CHECK(h >= 1 && w >= 1, "window ", h, "x", w, " is empty");
  return at::empty({b, store.size(1), h, w}, store.options().memory_format(store.suggest_memory_format()));
}

}  // namespace apart
