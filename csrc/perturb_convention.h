// PyTorch's clamp-gradient convention at exactly a bound, measured on the installed torch (needs autograd,
// so only the binding translation units include this header).
#pragma once

#include <torch/extension.h>

namespace apart {

// Whether torch.clamp(v, lo, hi) passes the gradient where v == lo or v == hi (version-dependent).
inline bool measure_clamp_grad_at_bound() {
  torch::AutoGradMode enable(true);
  auto v = torch::tensor({0.0, 1.0}, torch::dtype(torch::kDouble).requires_grad(true));
  auto grad = torch::autograd::grad({torch::clamp(v, 0.0, 1.0).sum()}, {v})[0];
  const bool lo = grad[0].item<double>() != 0.0, hi = grad[1].item<double>() != 0.0;
  TORCH_CHECK(lo == hi, "apart_fast: torch.clamp's gradient at its bounds is asymmetric (", grad, "); unsupported");
  return lo;
}

}  // namespace apart
