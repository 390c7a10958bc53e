"""Installs apart_fast, its Triton kernels (as apart_fast.kernels), the console script and the C++/CUDA extensions.

Extensions: ``apart_fast._C_cpu`` is always built (needs only a C++ compiler). ``apart_fast._C_cuda`` is
built when nvcc is found (CUDA_HOME or PATH) and torch has CUDA, or when ``APART_FAST_FORCE_CUDA=1``;
``APART_FAST_NO_CUDA=1`` skips it. A missing CUDA toolchain is a warning, never a failed install.
Defaults: ``TORCH_CUDA_ARCH_LIST=9.0`` when unset, ``MAX_JOBS`` from the environment else 2.

CPU code generation: ``_C_cpu`` is compiled with ``-O3 -march=native -ffp-contract=off``. ``-march=native``
targets the building machine's vector units (AVX2/AVX-512 here), so the library is built where it runs:
a source install, as CI does on the machine kind it tests on; do not copy the built ``.so`` to another
CPU. ``APART_FAST_CPU_ARCH`` overrides the target: a ``-march`` value (``x86-64-v3``, ``znver4``, ...)
or ``none`` for the compiler's portable default. ``-ffp-contract=off`` forbids fused multiply-adds, which
would round differently from the eager reference that the outputs must equal bit for bit.
"""

import os
import warnings

from setuptools import find_packages, setup

os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions() -> tuple[list, dict]:
    """The extension modules to build and the cmdclass that builds them (empty when torch is missing)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (e.g. egg_info without torch)
        warnings.warn("torch is not importable: building apart_fast without its C++/CUDA extensions", stacklevel=1)
        return [], {}
    arch = os.environ.get("APART_FAST_CPU_ARCH", "native").strip() or "native"
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + ([] if arch.lower() == "none" else [f"-march={arch}"])
    exts = [
        cpp_extension.CppExtension(
            "apart_fast._C_cpu",
            ["csrc/perturb_cpu.cpp"],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = not _flag("APART_FAST_NO_CUDA")
    has_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if want_cuda and (_flag("APART_FAST_FORCE_CUDA") or (has_nvcc and torch.version.cuda is not None)):
        exts.append(
            cpp_extension.CUDAExtension(
                "apart_fast._C_cuda",
                ["csrc/perturb_cuda_bind.cpp", "csrc/perturb_cuda.cu"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    elif want_cuda:
        why = "nvcc not found (set CUDA_HOME)" if not has_nvcc else "torch was built without CUDA"
        warnings.warn(f"apart_fast: skipping the CUDA extension: {why}", stacklevel=1)

    class Build(cpp_extension.BuildExtension):
        """BuildExtension (ninja) whose CUDA part may fail with a warning: the CPU module still installs."""

        def build_extensions(self) -> None:
            self._failed: list = []
            super().build_extensions()
            # drop what failed so that the install does not look for its (absent) library
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext) -> None:  # noqa: ANN001 (setuptools signature)
            if ext.name != "apart_fast._C_cuda" or _flag("APART_FAST_FORCE_CUDA"):
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as err:  # a broken CUDA toolchain must not fail the install
                self._failed.append(ext)
                warnings.warn(f"apart_fast: the CUDA extension failed to build ({err}); continuing without it",
                              stacklevel=1)

    return exts, {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="apart_fast",
    version="0.1.0",
    description="APART adversarial training with fused perturbation kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["apart_fast", "apart_fast.*"]) + ["apart_fast.kernels"],
    package_dir={"apart_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "gpu": ["triton", "nvidia-ml-py"],
        # AutoAttack (apart-fast eval --attack autoattack, --sanity). torchattacks also pins requests~=2.25.1,
        # which it never imports; where that clashes: pip install --no-deps torchattacks==3.5.1 scipy
        "eval": ["torchattacks>=3.5.1,<3.6", "scipy"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["apart-fast=apart_fast.cli:main"]},
)
