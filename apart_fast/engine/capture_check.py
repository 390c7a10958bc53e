"""Capture safety checked on the CPU: every op a CUDA-graph capture of a step would record, inspected one by one.

A captured step may not synchronise the host with the device nor let data decide a shape. Inside
``torch.cuda.graph`` such an op fails (``.item()``, a device-to-host copy) or is frozen at its capture-time value
(a Python ``if`` on a tensor decided once, host data copied once), and a random draw from a generator the graph
does not own replays the same numbers at every step. ``CaptureChecker`` runs a step under a ``TorchDispatchMode``
(every aten op, those the C++ extensions call included) and a ``TorchFunctionMode`` (tensor methods that reach no
aten op on the CPU) and records each:

- host read: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``), ``is_nonzero``, ``equal``;
- data-dependent shape: ``nonzero`` (``torch.where(mask)``), ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` by a tensor, indexing or index-assignment by a boolean mask;
- host-device copy: host data made a tensor (``torch.tensor``, ``as_tensor``, ``from_numpy``: ``lift_fresh``),
  ``.cpu()``, ``.numpy()``, ``.tolist()``, ``torch.cuda.synchronize()``;
- random op drawing from a ``torch.Generator`` the graph does not register (the default generator is captured by
  PyTorch itself).

Ops issued by Triton's interpreter stand for a kernel launch on the GPU and are not inspected. What the CPU cannot
show: ``.to(device)`` of a host tensor looks like ``.to("cpu")`` on a CPU run, so it is not flagged (``torch.tensor``
and ``.cpu()`` are), and a draw from the default CPU generator looks like one from the device's.

``check_run`` builds a run as the engine does for CUDA graphs (``DeviceSGD``, ``DeviceSchedule``, the sync-free
keep-or-undo of ``step.guard``: the branches CUDA runs), on a backend CUDA dispatches to (``torch``, or ``triton``
under ``TRITON_INTERPRET=1``), runs the eager warm-up steps ``GraphStep`` runs, and checks the one call that
``GraphStep`` would capture; ``check_pgd_loop`` does the same for the PGD evaluation loop (``attacks.pgd.PGDLoop``).
``python -m apart_fast.engine.capture_check`` checks every method on both backends and exits 1 on any finding.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from apart_fast.config import ApartConfig, Config

HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal"}
DATA_SHAPED = {"nonzero", "nonzero_numpy", "argwhere", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive", "bincount"}
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}
HOST_METHODS = {"cpu", "numpy", "tolist"}
# Frames that are not the step's own code: torch's Python layers, Triton's launcher/interpreter (and this module).
_LIBRARY_PARTS = (os.sep + "torch" + os.sep, os.sep + "triton" + os.sep, os.sep + "contextlib.py")
METHODS = ("clean", "fgsm", "fgsm_rs", "nfgsm", "free", "pgd", "apart")  # the engine captures each of these
BACKENDS = ("torch", "triton")


@dataclasses.dataclass(frozen=True)
class Violation:
    """One op a capture could not record faithfully: its kind, the op and the innermost line of the step's code."""

    kind: str  # "host read", "data-dependent shape", "host-device copy", "foreign generator"
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


def _where() -> str:
    """``file:line function`` of the innermost frame of the checked code (outside torch, Triton and this module)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__ and not any(part in frame.filename for part in _LIBRARY_PARTS):
            name = frame.filename
            for root in ("apart_fast" + os.sep, "kernels" + os.sep, "tests" + os.sep, "benchmarks" + os.sep):
                if root in name:
                    name = root + name.rsplit(root, 1)[1]
                    break
            return f"{name}:{frame.lineno} {frame.name}"
    return "?"


def _in_triton_launch() -> bool:
    """Whether the current op comes from Triton's launcher (the interpreter standing in for a GPU kernel launch)."""
    return any(os.sep + "triton" + os.sep in f.filename for f in traceback.extract_stack()[:-2])


def _flat(args: Iterable[Any]) -> Iterator[Any]:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


class _Ops(TorchDispatchMode):
    def __init__(self, checker: CaptureChecker) -> None:
        super().__init__()
        self.checker = checker

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        kind = None
        if name in HOST_READS:
            kind = "host read"
        elif name in DATA_SHAPED or name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None:  # repeats as a tensor: the output's length is their sum
            kind = "data-dependent shape"
        elif name in MASK_INDEXED and any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                          for t in _flat(args[1:2])):
            kind = "data-dependent shape"
        elif name in HOST_DATA:
            kind = "host-device copy"
        else:
            gens = [g for g in _flat([*args, *kwargs.values()]) if isinstance(g, torch.Generator)]
            if any(not self.checker.owns(g) for g in gens):
                kind = "foreign generator"
        if kind is not None:
            self.checker.record(kind, str(func))
        return func(*args, **kwargs)


class _Methods(TorchFunctionMode):
    def __init__(self, checker: CaptureChecker) -> None:
        super().__init__()
        self.checker = checker

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS:
            self.checker.record("host-device copy", f"Tensor.{name}()")
        return func(*args, **(kwargs or {}))


class CaptureChecker:
    """Context manager recording every op of the code run inside it that a CUDA-graph capture could not record
    faithfully (see the module docstring). ``generators``: those the graph registers (``GraphStep.generators``)."""

    def __init__(self, generators: Iterable[torch.Generator] = ()) -> None:
        self.generators = list(generators)
        self.violations: list[Violation] = []
        self._stack = contextlib.ExitStack()

    def owns(self, g: torch.Generator) -> bool:
        """Whether the graph registers ``g``: the dispatcher hands ops a new Python object for the same generator,
        so it is recognised by device, seed and state (a foreign generator never has all three equal in practice)."""
        return any(g.device == o.device and g.initial_seed() == o.initial_seed() and torch.equal(g.get_state(), o.get_state())
                   for o in self.generators)

    def record(self, kind: str, op: str) -> None:
        if not _in_triton_launch():
            self.violations.append(Violation(kind, op, _where()))

    def _synchronize(self, *args: Any, **kwargs: Any) -> None:
        self.record("host-device copy", "torch.cuda.synchronize()")

    def __enter__(self) -> CaptureChecker:
        self._stack.enter_context(_patched(torch.cuda, "synchronize", self._synchronize))
        self._stack.enter_context(_Methods(self))
        self._stack.enter_context(_Ops(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def check(fn: Callable[[], Any], generators: Iterable[torch.Generator] = ()) -> list[Violation]:
    """Run ``fn()`` under a ``CaptureChecker``; its violations (empty: capture records ``fn`` faithfully)."""
    with CaptureChecker(generators) as chk:
        fn()
    return chk.violations


@contextlib.contextmanager
def capturable(method: str) -> Iterator[None]:
    """Treat ``method`` as capturable inside the block, to check a step the engine keeps eager (GradAlign)."""
    from apart_fast.methods import METHOD_CLASSES

    cls = METHOD_CLASSES[method]
    saved = cls.__dict__.get("capturable")
    cls.capturable = True
    try:
        yield
    finally:
        if saved is None:
            del cls.capturable
        else:
            cls.capturable = saved


def tiny_config(method: str, backend: str, amp: str = "none", ema: float | None = 0.99, **kw: Any) -> Config:
    """A small run (96 synthetic 16x16 images, smallcnn width 4, batch 16) with every captured piece switched on:
    the CUDA-graph step, the EMA, APART's layer perturbation, the fp16 loss scale under ``amp="fp16"``."""
    return Config(method=method, dataset="synthetic", train_subset=96, model="smallcnn", width=4, batch_size=16, epochs=1,
                  pgd_steps=2, free_replays=2, device="cpu", backend=backend, amp=amp, ema=ema, cuda_graphs=True,
                  eval_n=16, eval_steps=1, final_eval_steps=0, apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01),
                  **kw)


def check_run(cfg: Config) -> list[Violation]:
    """The violations of the step ``GraphStep`` would capture for ``cfg`` (which must ask for ``cuda_graphs``)."""
    from apart_fast.engine.run import Run

    run = Run(cfg)
    stepper = run.stepper
    if stepper is None:
        raise ValueError("check_run needs a config with cuda_graphs=True (the step the engine captures)")
    run.model.train()
    batches = iter(run.loader)
    for _ in range(stepper.warmup):  # the eager steps GraphStep runs before it captures
        stepper(next(batches))
    if not stepper._load(next(batches)):
        raise ValueError("the checked batch has another shape than the warm-up batches")
    return check(lambda: stepper.fn(stepper.static), stepper.generators)


def check_pgd_loop(backend: str, steps: int = 2) -> list[Violation]:
    """The violations of the PGD evaluation loop's captured body (``PGDLoop.body``) on a small model."""
    from apart_fast.attacks.pgd import PGDLoop, ce_loss, eval_mode
    from apart_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=3, width=4)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    x0 = (x + (torch.rand_like(x) * 2 - 1) * 8 / 255).clamp(0, 1)  # drawn eagerly, outside the loop, as _pgd does
    loop = PGDLoop(model, ce_loss, 8 / 255, 2 / 255, steps, backend)
    with eval_mode(model):
        for _ in range(2):  # PGDLoop._capture's warm-up runs
            loop.body(x, y, x0)
        return check(lambda: loop.body(x, y, x0))


def build_parser() -> argparse.ArgumentParser:
    """``python -m apart_fast.engine.capture_check``'s options."""
    ap = argparse.ArgumentParser(prog="python -m apart_fast.engine.capture_check", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (gradalign: checked as if captured)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="op backends CUDA dispatches to: torch, triton")
    ap.add_argument("--amp", default="none", help="none, bf16 or fp16 (the fp16 loss scale is captured too)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Check every captured method's step and the PGD evaluation loop; print the findings, exit 1 if any."""
    args = build_parser().parse_args(argv)
    bad = 0
    for backend in args.backends.split(","):
        for method in args.methods.split(","):
            with capturable(method):
                found = check_run(tiny_config(method, backend, args.amp))
            bad += bool(found)
            print(f"{method:10s} {backend:7s} {'ok' if not found else f'{len(found)} finding(s)'}")
            for v in found:
                print(f"    {v}")
        found = check_pgd_loop(backend)
        bad += bool(found)
        print(f"{'pgd-eval':10s} {backend:7s} {'ok' if not found else f'{len(found)} finding(s)'}")
        for v in found:
            print(f"    {v}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors; before Triton is imported
    sys.exit(main())
