"""One dataclass for a run: every knob with its unit, saved with every checkpoint and result."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, field

METHODS = ("clean", "fgsm", "fgsm_rs", "nfgsm", "gradalign", "free", "pgd", "apart")
MODELS = ("preact18", "wrn34_10", "smallcnn", "vit")
TORCHVISION = "torchvision:"  # --model torchvision:NAME: any torchvision classification constructor (models/zoo.py)
STEMS = ("native", "cifar")
STORE_DTYPES = ("float32", "float16", "int8")
DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "synthetic")
AMP_MODES = ("auto", "none", "bf16", "fp16")
APART_SCHEDULES = ("auto", "script", "full")
SHORTCUTS = ("act", "raw")
SCRIPT_STEPS = 30 * 391  # length of the APART script's run (30 epochs of 391 steps), for which its generator lr was tuned
SCRIPT_LR, SCRIPT_STEP_SIZE = 5e-8, 1e-4  # the script's generator lr peak and initial a_init, a_in
SCRIPT_WEIGHT_DECAY = 400.0  # the script's L2 penalty lambda on the step sizes
SCRIPT_EPS = 0.031  # the script's training eps: the unit its constants are expressed in (see ApartConfig)
FULL_INIT, FULL_IN = 0.5, 1.0  # schedule full (the previous default): a_init and a_in start at these fractions of eps
AUTO_SPEED = 1.0  # schedule auto: the generator's lr x steps relative to the script's, in units of eps (README)
# schedule auto's L2 penalty at the script's eps: the penalty the authors' run had in effect (APART.md step 7: PyTorch 1.3's
# model SGD added lr 0.2 x wd 2e-4 of decay to the generator's 5e-8 x 400, so a* = G / 1200), in units of eps below
AUTO_WEIGHT_DECAY = SCRIPT_WEIGHT_DECAY


BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
MAX_INT = 2**31 - 1  # integer settings above this are typos (and overflow seeds and device buffers)
# Settings a resumed run may change (``--resume``): they change how the run is carried out or
# reported, not what it learns up to its checkpoint. ``epochs`` may only grow; ``lr`` rescales the
# rest of the model's cyclic schedule (to continue with a lower peak after --max-faults stopped it).
RESUME_MAY_CHANGE = ("epochs", "lr", "max_faults", "log_interval", "eval_every", "backend")
# What --model, --width and --epochs default to (Config's None) on each dataset: (model, width, epochs). CIFAR
# takes the paper's setting, digits the CPU demo's; imagefolder takes digits' for images under SMALL_IMAGE
# pixels on a side (the 8x8-to-16x16 scale SmallCNN suits), CIFAR's otherwise.
DATASET_DEFAULTS: dict[str, tuple[str, int, int]] = {
    "digits": ("smallcnn", 16, 15),
    "synthetic": ("smallcnn", 16, 10),
    "cifar10": ("preact18", 64, 30),
    "cifar100": ("preact18", 64, 30),
}
SMALL_IMAGE = 32


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the value and the fix."""


def _check_types(obj: object, prefix: str) -> None:
    """Raise ConfigError naming the first field of dataclass ``obj`` whose value does not have its declared type.

    Annotations are strings (``int``, ``float | None``...): ints are accepted for floats, bools never
    for numbers; numpy scalars become plain Python numbers so configs stay JSON-safe.
    """
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if v is None and "None" in kinds:
            continue
        base = kinds[0]
        if base == "bool":
            ok = isinstance(v, bool)
        elif base == "int":
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
            v = int(v) if ok else v
        elif base == "float":
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif base == "str":
            ok = isinstance(v, str)
        else:
            continue  # nested config: checked on its own
        if not ok:
            want = {"int": "an int", "float": "a number", "str": "a str", "bool": "a bool"}[base]
            want += " or None" if "None" in kinds else ""
            raise ConfigError(f"{type(obj).__name__}.{f.name} = {v!r} is a {type(v).__name__}; "
                              f"{prefix}{f.name.replace('_', '-')} must be {want}")
        object.__setattr__(obj, f.name, v)


def dataset_defaults(dataset: str, image_size: tuple[int, int] | None = None) -> tuple[str, int, int] | None:
    """(model, width, epochs) of a run on ``dataset`` that sets none of them; imagefolder's depend on the
    image size (HxW), so they are None until it is known."""
    if dataset == "imagefolder":
        if image_size is None:
            return None
        return DATASET_DEFAULTS["digits" if min(image_size) < SMALL_IMAGE else "cifar10"]
    return DATASET_DEFAULTS.get(dataset)


def check_budget(flag: str, v: float) -> None:
    """Raise ConfigError unless the L-inf budget ``v`` given as ``flag`` is in (0, 1] (images are in [0,1])."""
    if not 0 < v <= 1:
        raise ConfigError(f"{flag} {v} is outside (0, 1]; images are in [0,1], e.g. 8/255 = 0.0314")


@dataclass
class ApartConfig:
    """APART's generator (see ../shared/APART.md); ``schedule`` fills the settings left at None (``resolve``).

    Why the step sizes cannot run away: they ascend ``L2 - (lambda/2) * a^2`` (lambda =
    ``weight_decay``), whose gradient ``dL2/da - lambda*a`` vanishes at ``a = (dL2/da) / lambda``.
    With ``G`` a bound on ``|dL2/da|`` over the run, every update pulls ``a`` back once
    ``|a| > G/lambda``, so the iterates stay near ``|a| <= G/lambda`` (SGD momentum has the same
    fixed point; with a small enough lr the bound holds up to one step's overshoot). For the
    input step, ``|dL2/da_in| <= ||dL2/dx1||_1``. Nothing bounds ``G`` itself, so ``max_step``
    clamps ``|a|`` after every update as a last resort, and a non-finite gradient skips the
    update altogether (see apart_fast/step/guard.py).

    Schedules (README, "The default rule"):

    - ``auto`` (default): the script's generator expressed in units of eps, so that it carries over to
      any eps, image size and run length. With ``u = a / eps`` the update ``a += lr (dL/da - lambda a)``
      reads ``u += (lr / eps^2) (g - lambda eps^2 u)`` where ``g = eps dL/da`` is the loss gained by a
      full-eps step (nats; the same order for 8x8 digits and 32x32 CIFAR). ``auto`` holds the script's
      ``lambda eps^2`` and ``lr / eps^2 x steps`` (at eps 0.031 and 11,730 steps it *is* the script's
      lambda and lr), times ``AUTO_SPEED``, and starts at the script's 1e-4 in the same units; the
      step sizes then grow under their gradient towards ``u* = g / (lambda eps^2)``.
    - ``script``: the script's constants as they are (a_init = a_in = 1e-4, lr 5e-8, lambda 400).
    - ``full``: the previous default, kept for comparison: a_init = eps/2 and a_in = eps from the first
      step, lr x steps = the script's in image units, lambda 400 (the stored sign at full strength).
    """

    schedule: str = "auto"  # auto: the script's generator in units of eps (README); script: its constants; full: eps/2, eps at once
    a_init: float | None = None  # initial scale of the stored initialisation (image units); None: by --apart-schedule
    a_in: float | None = None  # initial input step size (image units); None: by --apart-schedule
    a_layer: float = 0.0  # initial step size of every block's layer perturbation
    a_layers: str | None = None  # comma-separated initial step size of each block in order (overrides --apart-a-layer)
    omega_std: float = 1e-3  # std of the N(0, std^2) noise the per-example store starts from
    lr: float | None = None  # peak of the generator's cyclic lr (0 -> lr -> 0); None: by --apart-schedule
    weight_decay: float | None = None  # L2 penalty lambda (image units): ascent on L2 - (lambda/2) * sum(a^2); None: by --apart-schedule
    max_step: float = 1.0  # hard clamp on |a| after every update, a last resort against run-away
    layer_perturb: bool = True  # False: the ablation without layer-wise perturbations
    store: bool = True  # False: the ablation without the per-example store: every step starts from fresh U(-1, 1) noise
    store_dtype: str = "float32"  # the store's omega: float32 (4 bytes a padded pixel), float16 (2) or int8 (1, steps of 1/127)
    sites: str = "auto"  # where the layer-wise perturbation goes: auto, or comma-separated names of the layers whose input it perturbs
    freeze_bn_pass1: bool = False  # True: pass 1 leaves BatchNorm running statistics untouched
    legacy_model_decay: bool = False  # True: PyTorch 1.3 behaviour, the model's SGD also decays the step sizes

    def __post_init__(self) -> None:
        _check_types(self, "--apart-")

    def layer_starts(self, n: int) -> list[float]:
        """The initial step size of each of ``n`` blocks: ``a_layers`` if given (exactly n values), else ``a_layer`` each."""
        if self.a_layers is None:
            return [self.a_layer] * n
        vals = parse_floats(self.a_layers, "--apart-a-layers")
        if len(vals) != n:
            raise ConfigError(f"--apart-a-layers gives {len(vals)} values but the model has {n} perturbed blocks; "
                              f"pass {n} comma-separated values")
        return vals

    def resolve(self, eps: float, steps: int) -> ApartConfig:
        """A copy with every None filled by ``schedule`` for a run of ``steps`` steps at budget ``eps``."""
        steps = max(int(steps), 1)
        if self.schedule == "auto":
            unit = (eps / SCRIPT_EPS) ** 2  # the script's constants are in units of its eps, 0.031
            init = step = SCRIPT_STEP_SIZE * eps / SCRIPT_EPS
            lr, wd = AUTO_SPEED * SCRIPT_LR * SCRIPT_STEPS / steps * unit, AUTO_WEIGHT_DECAY / unit
        elif self.schedule == "full":
            init, step = FULL_INIT * eps, FULL_IN * eps
            lr, wd = SCRIPT_LR * SCRIPT_STEPS / steps, SCRIPT_WEIGHT_DECAY
        else:
            init = step = SCRIPT_STEP_SIZE
            lr, wd = SCRIPT_LR, SCRIPT_WEIGHT_DECAY
        return dataclasses.replace(self, a_init=min(init, self.max_step) if self.a_init is None else self.a_init,
                                   a_in=min(step, self.max_step) if self.a_in is None else self.a_in,
                                   lr=lr if self.lr is None else self.lr,
                                   weight_decay=wd if self.weight_decay is None else self.weight_decay)


def integer(s: str) -> int:
    """An integer, also written as a whole float such as 1e5 (the range is checked by Config.validate); an argparse type."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        f = math.nan
    if not math.isfinite(f) or not f.is_integer():
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer (e.g. 50 or 1e3)")
    return int(f)


def float_or_fraction(s: str) -> float:
    """A float, also written as a fraction such as 8/255; an argparse type (``fraction`` raises ConfigError instead)."""
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (e.g. 0.03 or 8/255)") from None


def fraction(text: str, flag: str) -> float:
    """A number, also written as a fraction such as ``8/255``; ConfigError naming ``flag`` otherwise."""
    try:
        num, _, den = text.strip().partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{flag} {text!r} is not a number (e.g. 0.03 or 8/255)") from None


def parse_floats(text: str, flag: str) -> list[float]:
    """Comma-separated numbers (``0.01,0.02``) as floats; ConfigError naming ``flag`` otherwise."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers (e.g. 0.01,0.02)") from None
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"{flag} {text!r} holds a value that is not finite; pass real numbers")
    return vals


@dataclass
class Config:
    """A training run. Image values are in [0,1]; eps and step sizes are in those units."""

    method: str = "apart"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None  # architecture; None: the dataset's (config.DATASET_DEFAULTS)
    width: int | None = None  # first stage's channels (preact18: 64 is the paper's); None: the dataset's with its model, else the model's
    shortcut: str = "act"  # projection shortcut's input: act = relu(bn1(x)) (the common PreAct block), raw = x (APART script)
    stem: str = "native"  # torchvision: models: native, or cifar (3x3 stride-1 conv, no max-pool; ViT: patch 4)
    epochs: int | None = None  # passes over the training data; None: the dataset's
    batch_size: int = 128
    keep_last_batch: bool = False  # train on the last partial batch too (the APART script's 391 steps per epoch)
    train_subset: int | None = None  # train on a seeded random N-image subset of the training split; None: all of it
    eps: float = 8 / 255  # training L-inf budget
    lr: float = 0.2  # peak of the model's cyclic learning rate (0 -> lr -> 0, stepped per iteration)
    momentum: float = 0.9  # cycled momentum -> momentum_low -> momentum, as CyclicLR does
    momentum_low: float = 0.8
    weight_decay: float = 2e-4
    pgd_steps: int = 10  # PGD-k training
    pgd_step: float | None = None  # PGD-k training's step; None: eps/4 (2/255 at eps 8/255), so k >= 4 steps reach the boundary
    fgsm_step: float | None = None  # None: eps for fgsm, 1.25*eps for fgsm_rs and gradalign
    nfgsm_k: float = 2.0  # N-FGSM's noise: U(-k*eps, k*eps) (de Jorge et al. 2022 use k = 2)
    nfgsm_step: float | None = None  # N-FGSM's sign step; None: eps (the paper's), no projection back to the eps-ball
    gradalign_lambda: float = 0.2  # GradAlign's weight of 1 - cos(grad at x, grad at x + noise) (the paper's for eps 8/255)
    free_replays: int = 8  # Free's m; it runs ceil(epochs/m) passes over the data, m replays each
    apart: ApartConfig = field(default_factory=ApartConfig)
    ema: float | None = None  # weight averaging: EMA decay (e.g. 0.999), evaluated and saved as model_ema.pt; None: off
    ema_warmup: float = 10.0  # the n-th EMA update uses decay min(ema, n / (n + ema_warmup)); 0: the fixed decay throughout
    pad: int | None = None  # crop padding; None: the dataset's default (4 for 32x32)
    pad_mode: str = "constant"
    pad_value: float = 0.5  # fill of constant padding (the APART script uses 0.5)
    flip: bool | None = None  # None: the dataset's default
    normalize: bool = False  # per-channel normalisation inside the model (the APART script uses none)
    eval_eps: float | None = None  # evaluation L-inf budget (validation and final PGD); None: the training --eps
    eval_step: float | None = None  # evaluation PGD step; None: eval eps / 4 (2/255 at 8/255)
    eval_steps: int = 10  # PGD-k on the validation slice after each epoch (selects model_best.pt)
    eval_every: int = 1  # epochs between validation evaluations
    eval_n: int = 512  # validation slice: up to this many training-split images (at most a tenth), not trained on; 0: none
    final_eval_steps: int = 20  # PGD-20 on the whole test split at the end; 0: clean accuracy only
    final_eval_restarts: int = 1
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N
    seed: int = 0
    backend: str = "auto"  # perturbation-op backend: auto, torch, cpp, triton, cuda
    log_interval: int = 50  # steps between reads of the on-device running metrics and fault flags
    max_faults: int = 10  # stop the run after this many skipped non-finite steps
    out: str | None = None  # output folder; None: save nothing; "auto": a fresh runs/<method>-<dataset>-<date-time>/
    # Speed (none of these changes what is computed beyond float rounding):
    amp: str = "auto"  # autocast: auto (bf16 on CUDA devices that support it, else none), none, bf16, fp16 (loss-scaled)
    cuda_graphs: bool | None = None  # capture the steady-state step in a CUDA graph; None: on for CUDA when the method can
    channels_last: bool | None = None  # NHWC memory format for the model and batches; None: on for CUDA
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager generates no code (quick CPU checks)
    sync_bn: bool = False  # several CUDA processes: SyncBatchNorm (global batch statistics) instead of per-rank ones

    def __post_init__(self) -> None:
        if not isinstance(self.apart, ApartConfig):
            raise ConfigError(f"Config.apart = {self.apart!r} is a {type(self.apart).__name__}; pass an ApartConfig")
        _check_types(self, "--")

    def validate(self) -> Config:
        """Raise ConfigError on the first bad value (types, ranges, choices); return self so calls chain."""
        for obj, prefix in ((self, "--"), (self.apart, "--apart-")):
            _check_types(obj, prefix)  # again: fields may have been assigned after construction
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                flag = f"{prefix}{f.name.replace('_', '-')}"
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{flag} {v} is not a finite number; pass a real value")
                if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                    raise ConfigError(f"{flag} {v} is too large (at most {MAX_INT}); pass a smaller value")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model is not None and self.model not in MODELS and not (
                self.model.startswith(TORCHVISION) and len(self.model) > len(TORCHVISION)):
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)} or {TORCHVISION}NAME "
                              f"(a torchvision classification model, e.g. {TORCHVISION}resnet18)")
        if self.stem not in STEMS:
            raise ConfigError(f"--stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        if self.stem != "native" and not (self.model or "").startswith(TORCHVISION):
            model = self.model or DATASET_DEFAULTS.get(self.dataset, ("the dataset's default model",))[0]
            raise ConfigError(f"--stem {self.stem} adapts {TORCHVISION} models; {model} has a stem for small images "
                              "already, drop --stem")
        if self.apart.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--apart-store-dtype {self.apart.store_dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        if not self.apart.sites.strip(" ,"):
            raise ConfigError("--apart-sites is empty; pass auto or comma-separated layer names such as layer1.0.conv1")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        check_budget("--eps", self.eps)
        if self.eval_eps is not None:
            check_budget("--eval-eps", self.eval_eps)
        for name in ("epochs", "batch_size", "free_replays", "eval_every", "log_interval", "max_faults", "final_eval_restarts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        for name in ("lr", "pgd_step", "eval_step", "weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is negative; pass a value >= 0")
        for name in ("pgd_steps", "eval_steps", "final_eval_steps", "eval_n"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is negative; pass a value >= 0")
        if self.fgsm_step is not None and self.fgsm_step <= 0:
            raise ConfigError(f"--fgsm-step {self.fgsm_step} must be positive; pass a step > 0 or leave it unset (the default)")
        for name in ("nfgsm_k", "nfgsm_step"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {v} must be positive; pass a value > 0 (or leave it at its default)")
        if self.gradalign_lambda < 0:
            raise ConfigError(f"--gradalign-lambda {self.gradalign_lambda} is negative; pass a weight >= 0 (0.2 is the paper's)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema {self.ema} is not a decay in (0, 1); pass e.g. --ema 0.999, or leave it off")
        if self.ema_warmup < 0:
            raise ConfigError(f"--ema-warmup {self.ema_warmup} is negative; pass a value >= 0 (0: no warm-up)")
        a = self.apart
        for name in ("a_init", "a_in", "a_layer", "omega_std", "lr", "weight_decay"):
            if getattr(a, name) is not None and getattr(a, name) < 0:
                raise ConfigError(f"--apart-{name.replace('_', '-')} {getattr(a, name)} is negative; step sizes and rates are >= 0")
        if not a.max_step > 0:
            raise ConfigError(f"--apart-max-step {a.max_step} must be positive; it is the hard clamp on |step size|")
        if a.a_layers is not None:
            vals = parse_floats(a.a_layers, "--apart-a-layers")
            if any(abs(v) > a.max_step for v in vals):
                raise ConfigError(f"--apart-a-layers {a.a_layers} holds a value above --apart-max-step {a.max_step}; "
                                  "lower it or raise the clamp")
        for name in ("a_init", "a_in", "a_layer"):
            if getattr(a, name) is not None and getattr(a, name) > a.max_step:
                raise ConfigError(f"--apart-{name.replace('_', '-')} {getattr(a, name)} exceeds --apart-max-step "
                                  f"{a.max_step}; lower it or raise the clamp")
        if a.schedule not in APART_SCHEDULES:
            raise ConfigError(f"--apart-schedule {a.schedule!r}; choose one of {', '.join(APART_SCHEDULES)}")
        if self.shortcut not in SHORTCUTS:
            raise ConfigError(f"--shortcut {self.shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError(f"--train-subset {self.train_subset} must be a positive integer; leave it unset for the whole split")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        if self.pad_mode not in ("constant", "reflect"):
            raise ConfigError(f"--pad-mode {self.pad_mode!r}; choose constant or reflect")
        if self.width is not None and self.width < 1:
            raise ConfigError(f"--width {self.width} must be a positive integer")
        if self.pad is not None and self.pad < 0:
            raise ConfigError(f"--pad {self.pad} is negative; pass a padding >= 0 (or leave it unset for the dataset's)")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} is negative; pass a seed in [0, {MAX_INT}]")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        return self

    def resolved(self, image_size: tuple[int, int] | None = None) -> Config:
        """The config (a copy, if anything is filled) with the settings left at None filled in.

        The attack settings from ``eps``: ``pgd_step`` = eps/4, ``eval_eps`` = eps, ``eval_step`` = eval_eps/4,
        so a run at another budget is trained and scored at it. ``model``, ``width`` (with a defaulted model
        only) and ``epochs`` from ``dataset_defaults`` (imagefolder's once ``image_size``, HxW, is given).
        """
        eval_eps = self.eps if self.eval_eps is None else self.eval_eps
        fill: dict[str, object] = {"pgd_step": self.eps / 4, "eval_eps": eval_eps, "eval_step": eval_eps / 4}
        defaults = dataset_defaults(self.dataset, image_size) if None in (self.model, self.epochs) else None
        if defaults is not None:
            model, width, epochs = defaults
            fill.update(model=model, epochs=epochs, width=width if self.model is None else None)
        changes = {k: v for k, v in fill.items() if getattr(self, k) is None and v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        """Plain nested dict of every field (JSON- and checkpoint-safe); ``from_dict`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Inverse of to_dict; unknown keys are an error so a foreign file is not half-read."""
        d = dict(d)
        apart = ApartConfig(**d.pop("apart", {}))
        return cls(apart=apart, **d)
