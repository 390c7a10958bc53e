// Python bindings of the CUDA primitives (module apart_fast._C_cuda); the kernels are in perturb_cuda.cu.
// Kept apart from the .cu file so that nvcc never compiles the pybind11/torch-extension headers.
#include <torch/extension.h>

#include "perturb_convention.h"

namespace apart {
namespace cuda {
std::tuple<at::Tensor, at::Tensor> perturb_init_fwd(const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps);
std::tuple<at::Tensor, at::Tensor> perturb_init_bwd(const at::Tensor& grad_x0, const c10::optional<at::Tensor>& grad_d0,
                                                   const at::Tensor& x, const at::Tensor& omega,
                                                   const at::Tensor& a_init, double eps);
std::tuple<at::Tensor, at::Tensor> sign_step_fwd(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                                                const at::Tensor& a, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_step_bwd(const at::Tensor& grad_x1,
                                                            const c10::optional<at::Tensor>& grad_d1,
                                                            const at::Tensor& x, const at::Tensor& d,
                                                            const at::Tensor& g, const at::Tensor& a, double eps);
at::Tensor pack_sign(const at::Tensor& g);
at::Tensor layer_perturb_fwd(const at::Tensor& h, const at::Tensor& s, const at::Tensor& a);
at::Tensor layer_perturb_bwd(const at::Tensor& grad_out, const at::Tensor& s);
at::Tensor pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& g, double step, double eps);
at::Tensor omega_gather(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop,
                        const at::Tensor& flip, const at::Tensor& src, int64_t h, int64_t w);
void omega_update(const at::Tensor& store, const at::Tensor& index, const at::Tensor& crop, const at::Tensor& flip,
                  const at::Tensor& src, const at::Tensor& g, const at::Tensor& ratio);
void set_clamp_grad_at_bound(bool at_bound);
bool clamp_grad_at_bound();
}  // namespace cuda
}  // namespace apart

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace apart::cuda;
  m.doc() = "APART perturbation primitives, CUDA (see apart_fast/ops/dispatch.py for the interface)";
  {
    py::gil_scoped_release no_gil;  // the autograd engine runs without the GIL
    set_clamp_grad_at_bound(apart::measure_clamp_grad_at_bound());
  }
  m.def("clamp_grad_passes_at_bound", &clamp_grad_at_bound,
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
