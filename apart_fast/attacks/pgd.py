"""L-inf PGD attack and robust evaluation (the paper's PGD-20, step 2/255, random start, eval mode).

The attack takes input gradients only (``torch.autograd.grad(loss, x_adv)``): parameters' ``.grad``
are never touched, so it is safe to call in the middle of training. Each step is
``apart_fast.ops.pgd_step``, whose fused kernels replace the reference behind the same signature.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast import ops

LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example (shape ``(B,)``); the attack sums it for the gradient."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin per example: ``max_{j != y} z_j - z_y`` (positive iff misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    own = F.one_hot(y, logits.shape[1]).bool()
    z_other = logits.masked_fill(own, float("-inf")).amax(dim=1)
    return z_other - z_y


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block; restore every submodule's own train/eval flag after."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in states:
            m.training = training


def _loss_fn(loss: str) -> LossFn:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[loss]


def _check_attack_args(eps: float, step: float, steps: int, restarts: int, loss: str) -> None:
    """One-line ValueErrors for attack settings that make no sense."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1] (images are in [0, 1]), got {eps}")
    if not step > 0.0:
        raise ValueError(f"step must be positive, got {step}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    _loss_fn(loss)


def _check_images(x: Tensor, y: Tensor) -> None:
    """Float images in [0, 1] with one integer label each; one-line ValueError naming what was seen."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor in [0, 1] here, got dtype {x.dtype}")
    if x.ndim < 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x (N, ...) and y (N,) must agree, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must be in [0, 1], observed min {lo:.6g} and max {hi:.6g} (scale uint8 images by 1/255)")


def expected_channels(model: nn.Module) -> int | None:
    """Input channels ``model`` takes: from ``model.config`` when built here, else its first Conv2d."""
    kwargs = getattr(model, "config", {}).get("kwargs", {}) if isinstance(getattr(model, "config", None), dict) else {}
    if "in_channels" in kwargs:
        return int(kwargs["in_channels"])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _check_channels(model: nn.Module, x: Tensor) -> None:
    """One-line ValueError when images have another channel count than the model's input."""
    want = expected_channels(model)
    if want is not None and x.ndim == 4 and x.shape[1] != want:
        raise ValueError(
            f"images have {x.shape[1]} channels but the model takes {want}; pass images shaped (N, {want}, H, W)"
        )


def _random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """``clamp(x + U[-eps, eps], 0, 1)``; noise drawn on the generator's device, then moved to ``x``'s."""
    dev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return torch.clamp(x + (2.0 * u - 1.0) * eps, 0.0, 1.0)


class PGDLoop:
    """PGD from a given start: ``steps`` sign steps (``ops.pgd_step``), then the final loss and whether it fools.

    With ``graphs`` (CUDA tensors only) each input shape is captured once as a CUDA graph, after two
    warm-up runs on a side stream, and replayed for every later batch of that shape; otherwise the
    same ``body`` runs eagerly. Both run in fp32 (autocast off). The graph's outputs are static
    tensors, overwritten by the next call: the caller consumes them first (``_pgd`` does).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, eps: float, step: float, steps: int, backend: str,
                 graphs: bool = False) -> None:
        self.model, self.loss_fn, self.eps, self.step, self.steps, self.backend = model, loss_fn, eps, step, steps, backend
        self.graphs = graphs
        self.captures = 0  # graphs captured so far: one per distinct batch shape
        self._cache: dict[tuple, tuple[Any, tuple[Tensor, ...], tuple[Tensor, ...]]] = {}

    def body(self, x: Tensor, y: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_adv, loss per example, fooled per example)`` after ``steps`` steps from ``x0``."""
        x_adv = x0.detach()
        with torch.autocast(x.device.type, enabled=False):
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    total = self.loss_fn(self.model(x_adv), y).sum()
                    (g,) = torch.autograd.grad(total, x_adv)
                x_adv = ops.pgd_step(x_adv.detach(), x, g, self.step, self.eps, backend=self.backend).detach()
            with torch.no_grad():
                logits = self.model(x_adv)
                return x_adv, self.loss_fn(logits, y), logits.argmax(dim=1) != y

    def __call__(self, x: Tensor, y: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``body(x, y, x0)``: replayed from this shape's graph when graphs are on, else run eagerly."""
        if not (self.graphs and x.is_cuda):
            return self.body(x, y, x0)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._cache:
            try:
                self._cache[key] = self._capture(x, y, x0)
            except RuntimeError as err:  # e.g. a model that syncs with the host inside forward
                warnings.warn(f"PGD: CUDA graph capture failed ({_first_line(err)}); running the attack eagerly",
                              stacklevel=2)
                self.graphs = False
                return self.body(x, y, x0)
        graph, (sx, sy, s0), outs = self._cache[key]
        sx.copy_(x)
        sy.copy_(y)
        s0.copy_(x0)
        graph.replay()
        return outs

    def _capture(self, x: Tensor, y: Tensor, x0: Tensor) -> tuple[Any, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Static copies of the inputs, two warm-up runs on a side stream, then one captured ``body``."""
        static = (x.clone(), y.clone(), x0.clone())
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # cuDNN picks its algorithms and autograd allocates its buffers outside the capture
                self.body(*static)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own memory pool: graphs of different shapes never share buffers
            outs = self.body(*static)
        self.captures += 1
        return graph, static, outs


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, TF32 off for matmuls and convolutions inside the block (restored after): attacks run in true fp32."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step: float,
    steps: int,
    restarts: int,
    loss_fn: LossFn,
    random_start: bool,
    generator: torch.Generator | None,
    backend: str,
    loop: PGDLoop | None = None,
) -> Tensor:
    """Unchecked PGD core; the model is assumed to be in eval mode already. ``loop`` (built here when None)
    runs the steps; the random starts are drawn eagerly from ``generator``, so graphs change no number."""
    loop = PGDLoop(model, loss_fn, eps, step, steps, backend) if loop is None else loop
    x = x.detach()
    best = x.clone()
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    for _ in range(restarts):
        x0 = _random_start(x, eps, generator) if random_start else x
        x_adv, cur_loss, fooled = loop(x, y, x0)
        # Keep a misclassifying perturbation once found; among non-misclassifying ones, the highest loss.
        better = (fooled & ~best_fooled) | (~fooled & ~best_fooled & (cur_loss.to(best_loss.dtype) > best_loss))
        best = torch.where(better.view(bshape), x_adv, best)
        best_loss = torch.where(better, cur_loss.to(best_loss.dtype), best_loss)
        best_fooled = best_fooled | fooled
    return best


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """L-inf PGD on a batch: returns ``x_adv`` with ``|x_adv - x| <= eps`` and ``x_adv`` in [0, 1].

    Random start ``U[-eps, eps]`` (then clamped to [0, 1]), ``steps`` sign steps of size ``step`` via
    ``ops.pgd_step``. Over ``restarts``, each example keeps the first perturbation that misclassifies
    it, else the one with the highest loss. Runs in eval mode (previous modes restored) and takes
    input gradients only, so parameters' ``.grad`` and ``requires_grad`` are left as they were.
    """
    _check_attack_args(eps, step, steps, restarts, loss)
    _check_images(x, y)
    _check_channels(model, x)
    with eval_mode(model):
        return _pgd(model, x, y, eps, step, steps, restarts, _loss_fn(loss), random_start, generator, backend)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


CPU_BATCH = 256  # PGD-20 images/s on the CPU is flat from 128 up (README, "Evaluation speed")
GPU_MEMORY_SHARE = 0.5  # of the free device memory one evaluation batch may take
GPU_MAX_BATCH = 4096


def auto_batch_size(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Evaluation batch size for ``device``: ``CPU_BATCH`` on the CPU; on CUDA the largest power of two whose
    PGD step (forward and input gradient, measured at batch 32) fits in half the free memory, at most 4096."""
    if device.type != "cuda":
        return CPU_BATCH
    probe = 32
    x = torch.rand((probe, *image_shape), device=device, requires_grad=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with eval_mode(model), torch.enable_grad():
        torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    per_image = max((torch.cuda.max_memory_allocated(device) - base) / probe, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * GPU_MEMORY_SHARE / per_image)
    size = 1 << max(fit.bit_length() - 1, 0)
    return max(min(size, GPU_MAX_BATCH), 1)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int | None = None,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    device: torch.device | str | None = None,
    progress: bool = False,
    seed: int = 0,
    backend: str = "auto",
    random_start: bool = True,
    cuda_graphs: bool = True,
    loop: PGDLoop | None = None,
) -> dict[str, Any]:
    """Clean and PGD accuracy of ``model`` on ``(x, y)``, batch by batch, in eval mode.

    ``x`` is uint8 (N, C, H, W) (scaled by 1/255 per batch on the device) or float in [0, 1].
    ``device`` defaults to the model's; the model itself is not moved. ``steps=0`` evaluates clean
    accuracy only (``robust_acc`` is None). Returns ``{"clean_acc": float, "robust_acc": float | None, "n": int}``.
    The random starts come from a generator seeded with ``seed``, so results are reproducible;
    ``random_start=False`` starts at ``x`` (FGSM is ``steps=1, step=eps, random_start=False``).
    ``batch_size`` None sizes batches to the device (``auto_batch_size``). On CUDA the PGD steps run as
    one captured graph per batch shape (``PGDLoop``; ``cuda_graphs=False`` runs them eagerly), in fp32. ``loop``: a
    ``PGDLoop`` kept across calls (its graphs captured once), built for this model, loss, eps, step, steps and backend.
    """
    if steps > 0:
        _check_attack_args(eps, step, steps, restarts, loss)
    elif steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty set (x has 0 examples)")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"x (N, ...) and y (N,) must agree, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    _check_channels(model, x)
    is_uint8 = x.dtype == torch.uint8
    if not is_uint8:
        _check_images(x, y)
    dev = torch.device(device) if device is not None else _model_device(model)
    if batch_size is None:
        batch_size = auto_batch_size(model, tuple(x.shape[1:]), dev)
    loss_fn = _loss_fn(loss)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    if loop is None:
        loop = PGDLoop(model, loss_fn, eps, step, steps, backend, graphs=cuda_graphs and dev.type == "cuda")
    elif loop.model is not model or loop.loss_fn is not loss_fn or \
            (loop.eps, loop.step, loop.steps, loop.backend) != (eps, step, steps, backend):
        raise ValueError("loop was built for another model or attack; pass a PGDLoop made with this call's model, loss, "
                         "eps, step, steps and backend")

    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc="evaluate", unit="batch",
                      disable=None)  # None: no bar when stderr is not a terminal (CI, nohup, a pipe)
    clean = torch.zeros((), dtype=torch.long, device=dev)
    robust = torch.zeros((), dtype=torch.long, device=dev)
    with eval_mode(model), strict_fp32(dev):
        for i in starts:
            xb = x[i : i + batch_size].to(dev, non_blocking=True)
            xb = xb.float().div_(255.0) if is_uint8 else xb.detach()
            yb = y[i : i + batch_size].to(dev, non_blocking=True).long()
            with torch.no_grad():
                clean += (model(xb).argmax(dim=1) == yb).sum()
            if steps > 0:
                x_adv = _pgd(model, xb, yb, eps, step, steps, restarts, loss_fn, random_start, gen, backend, loop)
                with torch.no_grad():
                    robust += (model(x_adv).argmax(dim=1) == yb).sum()
    return {
        "clean_acc": clean.item() / n,
        "robust_acc": robust.item() / n if steps > 0 else None,
        "n": n,
    }


__all__ = ["LOSSES", "ce_loss", "cw_loss", "eval_mode", "evaluate", "pgd_attack"]
