"""APART (Li et al. 2020): a learnable perturbation generator trained by gradient ascent beside the model.

The generator is a per-example initialisation store ``omega`` (padded image frame, aligned through
crop and flip), an initialisation scale ``a_init``, an input step ``a_in`` and one step ``a_b`` per
residual block (a ``PerturbSite``). One step is two forward/backward passes; see ../shared/APART.md
for every equation. ``--apart-schedule script`` is the authors' released script's generator; the default
``auto`` is the same generator in units of eps for any run (``ApartConfig.resolve``). The step sizes are
updated by their own optimizer only (``legacy_model_decay`` restores PyTorch 1.3's extra decay by the
model's SGD). ``store=False`` is the ablation without the per-example store (fresh U(-1, 1) noise each step);
``store_dtype`` a compact store (``store.py``). A model without ``PerturbSite`` modules gets its sites
attached from outside (``models/attach.py``; ``ApartConfig.sites``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apart_fast import ops
from apart_fast.methods import store as stores
from apart_fast.methods.base import Method
from apart_fast.models.attach import AttachedSite, attach_sites
from apart_fast.models.sites import applying, find_sites, recording
from apart_fast.step.guard import conditional_step, gather_grads
from apart_fast.step.optim import FlatSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule

if TYPE_CHECKING:
    from collections.abc import Iterator

    from apart_fast.data import Batch


@contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics alone.

    In training mode a layer that does not track running statistics uses the batch's and writes no
    buffer: neither the statistics nor ``num_batches_tracked`` (which a ``momentum=None`` layer
    averages by), and a non-finite batch cannot reach them.
    """
    saved = []
    if enabled:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                saved.append(m)
                m.track_running_stats = False
    try:
        yield
    finally:
        for m in saved:
            m.track_running_stats = True


class Apart(Method):
    """Two passes per step: pass 1 finds the input and per-block gradient signs at the learned
    initialisation, pass 2 trains the model on the perturbed input with layer-wise perturbations,
    and the step sizes ascend on pass 2's loss."""

    name = "apart"
    passes = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The step sizes' start is known now; the lr needs the run's length and is set in ``attach``.
        a = self.gen = self.cfg.apart.resolve(self.cfg.eps, 1)
        # the model's own sites, else sites hooked onto its blocks from outside (one-line error if none is found)
        self.site_names = attach_sites(self.model, a.sites) if a.layer_perturb else []
        self.sites = find_sites(self.model) if a.layer_perturb else []
        dev = self.device
        self.a_init = nn.Parameter(torch.tensor(a.a_init, device=dev))
        self.a_in = nn.Parameter(torch.tensor(a.a_in, device=dev))
        self.a_layer = nn.Parameter(torch.tensor(a.layer_starts(len(self.sites)), dtype=torch.float32, device=dev))
        self.store: Tensor | None = self._new_store() if a.store else None
        # Ascent (maximize) on the step sizes, flat: gather, update and keep-or-undo in a few kernels.
        self.gen_optimizer: FlatSGD = FlatSGD(
            self.step_sizes(), lr=0.0, momentum=self.cfg.momentum, weight_decay=a.weight_decay, maximize=True
        )
        self.gen_schedule: CyclicSchedule | DeviceSchedule | None = None

    def _store_shape(self) -> tuple[int, int, int, int]:
        i = self.info
        return stores.store_shape(i.n_train, i.channels, i.height, i.width, i.pad)

    def _new_store(self) -> Tensor:
        """The per-example omega store, N(0, omega_std^2) in the padded frame, on the method's device (``store.py``)."""
        a = self.cfg.apart
        return stores.new_store(self._store_shape(), a.store_dtype, a.omega_std, self.cfg.seed + 2, self.info.channels_last,
                                self.device)

    def describe(self) -> list[str]:
        """Where the layer-wise perturbation goes and what the store takes, for the run's log."""
        hooked = any(isinstance(s, AttachedSite) for s in self.sites)
        where = f"on the input of {', '.join(self.site_names)} (hooks)" if hooked else f"at {', '.join(self.site_names)}"
        lines = [f"APART: {len(self.sites)} layer-wise perturbation sites {where}" if self.sites
                 else "APART: no layer-wise perturbation (--no-apart-layer-perturb)"]
        if self.store is not None:
            shape, dtype = self._store_shape(), self.cfg.apart.store_dtype
            others = ", ".join(f"{k} {stores.mib(stores.nbytes(shape, k))}" for k in stores.DTYPES if k != dtype)
            lines.append(f"APART: per-example store {' x '.join(map(str, shape))} {dtype} = "
                         f"{stores.mib(stores.nbytes(shape, dtype))} on {self.device} (--apart-store-dtype: {others})")
        return lines

    def step_sizes(self) -> list[nn.Parameter]:
        """The generator's learnable scalars, in a fixed order."""
        return [self.a_init, self.a_in, self.a_layer]

    def extra_model_params(self) -> list[nn.Parameter]:
        return self.step_sizes() if self.cfg.apart.legacy_model_decay else []

    def attach(self, optimizer: torch.optim.Optimizer, schedule: CyclicSchedule, total_steps: int) -> None:
        super().attach(optimizer, schedule, total_steps)
        m = (self.cfg.momentum, self.cfg.momentum_low)
        a = self.gen = self.cfg.apart.resolve(self.cfg.eps, total_steps)
        if isinstance(schedule, DeviceSchedule):  # CUDA-graph step: lr and momentum as device tensors (bound)
            self.gen_schedule = DeviceSchedule(self.gen_optimizer, total_steps, a.lr, m)
        else:
            self.gen_schedule = CyclicSchedule(self.gen_optimizer, total_steps, a.lr, m)

    def _pass1(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Initialise from the store and take pass 1's input and per-block gradient signs (no parameter grads)."""
        x, y, eps, be = batch.x, batch.y, self.cfg.eps, self.cfg.backend
        if self.store is None:  # the ablation without the store: a fresh U(-1, 1) start, like FGSM-RS's
            omega = torch.empty_like(x).uniform_(-1.0, 1.0, generator=self.generator)
        else:
            omega = stores.gather(self.store, batch.index, batch.crop, batch.flip, x, be)
        x0, d0 = ops.perturb_init(x, omega, self.a_init, eps, backend=be)
        x0_leaf = x0.detach().requires_grad_(True)
        with recording(self.sites), frozen_bn_stats(self.model, self.cfg.apart.freeze_bn_pass1), self.precision.autocast():
            loss1 = F.cross_entropy(self.model(x0_leaf), y)
            hs = [s.recorded for s in self.sites]
        for s in self.sites:
            s.recorded = None  # only ``hs`` holds them: freed after the grad, not kept through pass 2
        # Input gradients only: no parameter gradient, so no cross-rank reduction either. Only their
        # signs are used; fp16 scales the loss so that small gradients do not underflow to sign 0.
        grads = torch.autograd.grad(self.precision.scaled(loss1), [x0_leaf, *hs])
        signs = [ops.pack_sign(g, backend=be) for g in grads[1:]]
        return omega, d0, grads[0], signs

    def perturb(self, batch: Batch) -> Tensor:
        _, d0, g_x, _ = self._pass1(batch)
        x1, _ = ops.sign_step(batch.x, d0, g_x, self.a_in, self.cfg.eps, backend=self.cfg.backend)
        return x1.detach()

    def forward_backward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both passes and pass 2's backward: leaves dL2/dtheta and dL2/da in ``.grad``.

        Returns pass 2's loss and logits, dL2/dx1, and the omega-update ratio a_in/(a_init + 1e-7) (the
        script's) taken before any step-size update.
        """
        x, y, be = batch.x, batch.y, self.cfg.backend
        _, d0, g_x, signs = self._pass1(batch)
        x1, _ = ops.sign_step(x, d0, g_x, self.a_in, self.cfg.eps, backend=be)
        x1.retain_grad()
        alphas = [self.a_layer[i] for i in range(len(self.sites))]
        with applying(self.sites, signs, alphas, backend=be), self.precision.autocast():
            logits = self.model(x1)
            loss2 = F.cross_entropy(logits, y)
        ratio = (self.a_in / (self.a_init + 1e-7)).detach()  # the script's ratio: finite at a_init = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.gen_optimizer.zero_grad(set_to_none=True)
        self.precision.scaled(loss2).backward()
        return loss2, logits, x1.grad, ratio

    def update_grads(self) -> list[Tensor]:
        """The gradients pass 2 produced for the model and the step sizes, each once (zeros where none):
        each optimizer's flat gradient tensor when it is a ``FlatSGD``."""
        for p in self.step_sizes():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        seen: set[int] = set()
        out = []
        for g in [*gather_grads(self.optimizer), *gather_grads(self.gen_optimizer)]:
            if id(g) not in seen:
                seen.add(id(g))
                out.append(g)
        return out

    def step(self, batch: Batch) -> dict[str, Tensor]:
        """One APART step; where its loss or any gradient (model, step sizes, dL2/dx1) is not finite,
        the model update, the step-size update and the omega update are all skipped on the device."""
        loss2, logits, g_x1, ratio = self.forward_backward(batch)
        # Unscaled (fp16) and averaged across ranks: model and step-size gradients alike.
        ok = self.finish_backward(loss2, self.update_grads(), [g_x1, ratio])
        self.step_ok = ok
        self._ascend(ok)
        self.update_model(ok)
        # Skipped: omega + (-0.0)*sign(0) == omega bit for bit (x + -0.0 == x for every x, -0.0 included).
        g_safe = torch.where(ok, g_x1, 0.0)
        ratio_safe = torch.where(ok, ratio, -0.0)
        self._update_store(batch, g_safe, ratio_safe)
        return self.metrics(loss2, logits, batch.y)

    def _update_store(self, batch: Batch, g: Tensor, ratio: Tensor) -> None:
        """The omega update of every example of the global batch (the store is replicated on every rank,
        see step/distributed.py): the ranks all-gather the int8 sign of dL2/dx1 and the (index, crop,
        flip) rows, so every rank applies the same update in the same order. ``ratio`` is the same on
        every rank (identical step sizes, agreed keep flag)."""
        be = self.cfg.backend
        if self.store is None:
            return
        if not self.comm.distributed:
            stores.update(self.store, batch.index, batch.crop, batch.flip, g, ratio, be)
            return
        sign = self.comm.all_gather_cat(ops.pack_sign(g, backend=be))
        rows = torch.cat([batch.index[:, None], batch.crop.long(), batch.flip[:, None].long()], 1)
        rows = self.comm.all_gather_cat(rows)
        stores.update(self.store, rows[:, 0], rows[:, 1:3], rows[:, 3].bool(), sign, ratio, be)

    def _ascend(self, ok: Tensor | None = None) -> None:
        """Gradient ascent on the step sizes (their own SGD with ``maximize``, L2 penalty as weight decay), then the hard clamp.

        The L2 penalty keeps ``|a|`` near ``|dL2/da| / weight_decay`` (see ApartConfig); the clamp to
        ``max_step`` is the last resort. With ``ok`` False (a non-finite step) the update is undone.
        """
        for p in self.step_sizes():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # The gradients are already unscaled (fp16) and averaged across ranks by ``finish_backward``.
        if ok is None:
            self.gen_optimizer.step()
        else:
            conditional_step(self.gen_optimizer, ok)
        self.gen_schedule.step()
        bound = self.cfg.apart.max_step
        with torch.no_grad():
            self.gen_optimizer.flat_params.clamp_(-bound, bound)  # every step size is a view of it
        for p in self.step_sizes():
            # legacy_model_decay: the model's SGD then sees zero gradients (PyTorch 1.3's zero_grad);
            # otherwise None, so it skips them.
            p.grad = torch.zeros_like(p) if self.cfg.apart.legacy_model_decay else None

    def resolved(self) -> dict[str, Any]:
        """The generator's settings this run uses (``ApartConfig.resolve``), for results.json."""
        a = self.gen
        return {"schedule": a.schedule, "a_init": a.a_init, "a_in": a.a_in, "a_layer": a.a_layer, "a_layers": a.a_layers,
                "lr": a.lr, "weight_decay": a.weight_decay, "store": a.store, "layer_perturb": a.layer_perturb,
                "store_dtype": a.store_dtype, "store_bytes": stores.nbytes(self._store_shape(), a.store_dtype) if a.store else 0,
                "sites": self.site_names}

    def log_values(self) -> dict[str, float]:
        vals = {"a_init": float(self.a_init.detach()), "a_in": float(self.a_in.detach())}
        vals.update({f"a_layer{i}": float(v) for i, v in enumerate(self.a_layer.detach().cpu())})
        return vals

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "step_sizes": [p.detach().clone() for p in self.step_sizes()],
            "store": self.store,
            "gen_optimizer": self.gen_optimizer.state_dict(),
            "gen_schedule": self.gen_schedule.state_dict() if self.gen_schedule else None,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for p, v in zip(self.step_sizes(), state["step_sizes"]):
                p.copy_(v)
        if self.store is not None:
            self.store.copy_(state["store"])
        self.gen_optimizer.load_state_dict(state["gen_optimizer"])
        if self.gen_schedule is not None and state["gen_schedule"] is not None:
            self.gen_schedule.load_state_dict(state["gen_schedule"])
