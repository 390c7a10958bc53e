"""Triton kernels of apart_fast: raw-tensor primitives, no autograd (installed as ``apart_fast.kernels``).

The tensors of one elementwise op are dense in one shared memory format (any: NCHW, channels_last, ...; the
outputs take it through ``empty_like``), else the wrappers raise a one-line ValueError; the omega kernels address
the store and the image-frame tensor through their strides. Kernels launch under their tensors' CUDA device
(``cuda:N``). pgd_step rounds a Python-scalar eps to fp16/bf16 data's dtype before ``x -+ eps`` on CPU tensors only
(the interpreter), as PyTorch's CPU kernels do; on CUDA it stays fp32, as PyTorch's CUDA kernels keep it. A clamp
bound meeting a tensor of the data's dtype is rounded to it on every device (``_utils.step_launch``). Step sizes (``a``,
``a_init``, ``ratio``) are one-element tensors read by pointer inside the kernels, so launches never sync with the
host and can be captured in a CUDA graph.
Their shape matters as in PyTorch's type promotion: a 0-d step size is rounded to fp16/bf16 data's dtype before
it multiplies, a (1,) one is not (``_utils.step_dtype``); the kernels follow the reference for both.
Importing this package imports Triton but never queries the GPU. Set ``TRITON_INTERPRET=1`` before the import
to run the kernels on CPU tensors.
"""

from .layer_perturb import layer_perturb_bwd, layer_perturb_fwd
from .omega import omega_gather, omega_update
from .pack_sign import pack_sign
from .perturb_init import perturb_init_bwd, perturb_init_fwd
from .pgd_step import pgd_step
from .sign_step import sign_step_bwd, sign_step_fwd

__all__ = [
    "perturb_init_fwd",
    "perturb_init_bwd",
    "sign_step_fwd",
    "sign_step_bwd",
    "pack_sign",
    "layer_perturb_fwd",
    "layer_perturb_bwd",
    "omega_gather",
    "omega_update",
    "pgd_step",
]
