"""apart_fast: APART adversarial training with fused perturbation kernels."""

__version__ = "0.1.0"
