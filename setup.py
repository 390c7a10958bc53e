"""Installs apart_fast, its Triton kernels (as apart_fast.kernels) and the console script."""

from setuptools import find_packages, setup

setup(
    name="apart_fast",
    version="0.1.0",
    description="APART adversarial training with fused perturbation kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["apart_fast", "apart_fast.*"]) + ["apart_fast.kernels"],
    package_dir={"apart_fast.kernels": "kernels"},
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
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["apart-fast=apart_fast.cli:main"]},
)
