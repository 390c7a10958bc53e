// Elementwise math of the APART perturbation ops, written once for the CUDA kernels and the CPU loops.
//
// `acc_t` is the arithmetic type (float for fp32/fp16/bf16 storage, double for fp64); `scalar_t` is
// the storage type. The functions round to `scalar_t` exactly where the reference
// (apart_fast/ops/reference.py) materialises a tensor of the storage dtype, so the forward outputs
// and the clamp masks equal the reference's; only the step-size reductions (fp32) are more accurate.
// Two conventions of PyTorch's type promotion decide where that is for fp16/bf16 data:
//  - `kRoundStep`: a 0-d step size is cast to the data's dtype before it multiplies a tensor of that
//    dtype, so `a*s`, `d + a*s` and `omega + r*s` are tensors of the data's dtype (rounded); a
//    (1,)-shaped one takes part in promotion and they are fp32 tensors (not rounded).
//  - the clamp bound `eps` is passed in already rounded or not by the caller (perturb_checks.h):
//    `clamp_bound` rounds it to the data's dtype wherever the clamped value is a tensor of that dtype, on
//    every device, since autograd's clamp masks compare in that dtype on the CPU and on CUDA alike (the
//    outputs agree with either bound: the clamped value is rounded afterwards); `scalar_bound` gives
//    pgd_step's `x -+ eps` the device's rule (CPU: rounded, CUDA: fp32), which does change its output.
// For fp32/fp64 every rounding is the identity and both conventions coincide.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define APART_HD __host__ __device__ __forceinline__
#else
#define APART_HD inline
#endif

namespace apart {

// Round an arithmetic value to the storage dtype and back (identity for fp32/fp64).
template <typename scalar_t, typename acc_t>
APART_HD acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// torch.clamp semantics: NaN passes through (both comparisons are false). Two selects in sequence
// (equal to the nested form since lo <= hi) map to one max and one min instruction, vector or scalar.
template <typename acc_t>
APART_HD acc_t clamp(acc_t v, acc_t lo, acc_t hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// The mask of clamp's backward. Whether an element exactly at a bound passes the gradient is
// PyTorch's convention, which changed between versions (2.14: it does not); the extension measures
// the installed version's once at import (`at_bound`) so that the kernels follow the reference.
template <typename acc_t>
APART_HD bool inside(acc_t v, acc_t lo, acc_t hi, bool at_bound) {
  return at_bound ? (v >= lo && v <= hi) : (v > lo && v < hi);
}

// sign(v) in {-1, 0, 1}; NaN maps to 0.
template <typename acc_t>
APART_HD acc_t sign(acc_t v) {
  return static_cast<acc_t>((v > acc_t(0)) - (v < acc_t(0)));
}

template <typename acc_t>
APART_HD int8_t sign_i8(acc_t v) {
  return static_cast<int8_t>((v > acc_t(0)) - (v < acc_t(0)));
}

// ---- perturb_init: d0 = clamp(a*omega, -eps, eps); x0 = clamp(x + d0, 0, 1) ----

// a_init*omega as the reference forms it: in the data's dtype for a 0-d a_init (kRoundStep), else in fp32.
template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD acc_t init_pre(acc_t omega, acc_t a) {
  return kRoundStep ? round_to<scalar_t>(round_to<scalar_t>(a) * omega) : a * omega;
}

template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD void init_fwd(acc_t x, acc_t omega, acc_t a, acc_t eps, scalar_t& x0, scalar_t& d0) {
  const acc_t d = round_to<scalar_t>(clamp(init_pre<scalar_t, acc_t, kRoundStep>(omega, a), -eps, eps));
  d0 = static_cast<scalar_t>(d);
  x0 = static_cast<scalar_t>(clamp(x + d, acc_t(0), acc_t(1)));
}

// Returns this element's term of dL/da_init; writes dL/dx.
template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD acc_t init_bwd(acc_t gx0, acc_t gd0, acc_t x, acc_t omega, acc_t a, acc_t eps, bool at_bound, acc_t& gx) {
  const acc_t t = init_pre<scalar_t, acc_t, kRoundStep>(omega, a);
  const acc_t d = round_to<scalar_t>(clamp(t, -eps, eps));
  gx = inside(round_to<scalar_t>(x + d), acc_t(0), acc_t(1), at_bound) ? gx0 : acc_t(0);
  const acc_t total = round_to<scalar_t>(gd0 + gx);
  return inside(t, -eps, eps, at_bound) ? total * omega : acc_t(0);
}

// ---- sign_step: d1 = clamp(d + a*s, -eps, eps); x1 = clamp(x + d1, 0, 1), s = sign(g) ----

// d + a*s as the reference forms it (a*s is exact up to the rounding of a: s is -1, 0 or 1).
template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD acc_t step_pre(acc_t d, acc_t s, acc_t a) {
  return kRoundStep ? round_to<scalar_t>(d + round_to<scalar_t>(a * s)) : d + a * s;
}

template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD void step_fwd(acc_t x, acc_t d, acc_t s, acc_t a, acc_t eps, scalar_t& x1, scalar_t& d1) {
  const acc_t dn = round_to<scalar_t>(clamp(step_pre<scalar_t, acc_t, kRoundStep>(d, s, a), -eps, eps));
  d1 = static_cast<scalar_t>(dn);
  x1 = static_cast<scalar_t>(clamp(x + dn, acc_t(0), acc_t(1)));
}

// Returns this element's term of dL/da; writes dL/dx and dL/dd.
template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD acc_t step_bwd(acc_t gx1, acc_t gd1, acc_t x, acc_t d, acc_t s, acc_t a, acc_t eps, bool at_bound,
                        acc_t& gx, acc_t& gd) {
  const acc_t t = step_pre<scalar_t, acc_t, kRoundStep>(d, s, a);
  const acc_t dn = round_to<scalar_t>(clamp(t, -eps, eps));
  gx = inside(round_to<scalar_t>(x + dn), acc_t(0), acc_t(1), at_bound) ? gx1 : acc_t(0);
  const acc_t total = round_to<scalar_t>(gd1 + gx);
  gd = inside(t, -eps, eps, at_bound) ? total : acc_t(0);
  return gd * s;
}

// ---- layer_perturb: h + a*s (a*s is rounded to h's dtype for either shape of a) ----

template <typename scalar_t, typename acc_t>
APART_HD scalar_t layer_fwd(acc_t h, acc_t s, acc_t a) {
  return static_cast<scalar_t>(h + round_to<scalar_t>(a * s));
}

// ---- pgd_step: clamp(min(max(x_adv + step*s, x - eps), x + eps), 0, 1) ----

// `eps` as the caller's device rounds it (scalar_bound); a Python-scalar step times a sign rounds alike everywhere.
template <typename scalar_t, typename acc_t>
APART_HD scalar_t pgd(acc_t x_adv, acc_t x, acc_t s, acc_t step, acc_t eps) {
  acc_t z = round_to<scalar_t>(x_adv + round_to<scalar_t>(step * s));
  const acc_t lo = round_to<scalar_t>(x - eps);
  const acc_t hi = round_to<scalar_t>(x + eps);
  z = z < lo ? lo : z;
  z = z > hi ? hi : z;
  return static_cast<scalar_t>(clamp(z, acc_t(0), acc_t(1)));
}

// ---- omega_update: clamp(omega + ratio*s, -1, 1) ----

// +-1 are exact in every dtype: rounding before the clamp (0-d ratio) equals rounding after it ((1,) ratio).
template <typename scalar_t, typename acc_t, bool kRoundStep>
APART_HD scalar_t omega_new(acc_t omega, acc_t s, acc_t ratio) {
  return static_cast<scalar_t>(clamp(step_pre<scalar_t, acc_t, kRoundStep>(omega, s, ratio), acc_t(-1), acc_t(1)));
}

// Store column of output column j: the crop offset plus j, mirrored when the example is flipped.
APART_HD int64_t window_col(int64_t crop_x, int64_t j, int64_t width, bool flip) {
  return crop_x + (flip ? width - 1 - j : j);
}

}  // namespace apart
