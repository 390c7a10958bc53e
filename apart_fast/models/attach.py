"""Sites attached from outside: APART's layer-wise perturbation on a model whose code you did not write.

``attach_sites(model, "auto")`` finds the layers whose input APART perturbs and hooks a site onto each
(``PerturbSite.hook``): the site records or perturbs that layer's input only, so a shortcut or a
residual stream that reads the same activation reads it unperturbed, by construction. Nothing in the
model's code changes and its ``state_dict`` keeps its keys (a site holds no parameter); the site module
is registered as the child ``apart_site`` of its layer, so ``find_sites`` returns the sites in the
model's module order (the forward order for torchvision's models) and a deep copy keeps them.

What ``"auto"`` recognises, in module order:

- a residual convolution block: any module whose class name ends in ``Block`` or ``Bottleneck`` with a
  convolution child ``conv1``: torchvision's ``BasicBlock`` and ``Bottleneck`` (post-activation: conv1
  reads the block input, which the shortcut reads too), WideResNet and PreAct blocks of the usual code
  bases (conv1 reads ``relu(bn1(x))``). The site is conv1's input: the activation a block feeds its
  first layer, APART's rule.
- a pre-norm transformer block with torchvision's ``EncoderBlock`` layout (``ln_1``, ``self_attention``,
  ``ln_2``, ``mlp``): two sites, the normalised input of the attention (``ln_1(x)``, perturbed as the
  attention's query, key and value alike) and of the MLP (``ln_2(x)``, at its first linear layer); the
  residual stream ``x`` is never perturbed. Each sublayer of a pre-norm block is a residual branch of
  its own, as a residual block is in a ResNet.
- a model that already holds ``PerturbSite`` modules (the project's models, or one marked by hand) keeps
  them and gets none attached.

Any other model: pass the names of the layers whose input to perturb (``model.named_modules()`` names).
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence

from torch import nn

from apart_fast.models.sites import PerturbSite, find_sites

SITE_NAME = "apart_site"  # the attribute under which a layer holds its attached site


class AttachedSite(PerturbSite):
    """A site that acts on its parent layer's first input through hooks (see ``PerturbSite.hook``)."""


def _is_conv_block(m: nn.Module) -> bool:
    return type(m).__name__.endswith(("Block", "Bottleneck")) and isinstance(m._modules.get("conv1"), nn.Conv2d)


def _is_encoder_block(m: nn.Module) -> bool:
    mlp = m._modules.get("mlp")
    return (isinstance(m._modules.get("self_attention"), nn.MultiheadAttention) and isinstance(mlp, nn.Sequential)
            and len(mlp) > 0 and isinstance(mlp[0], nn.Linear) and "ln_1" in m._modules and "ln_2" in m._modules)


def auto_targets(model: nn.Module) -> list[str]:
    """The names of the layers whose input ``"auto"`` perturbs (module docstring), in module order."""
    out = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if _is_conv_block(m):
            out.append(f"{prefix}conv1")
        elif _is_encoder_block(m):
            out += [f"{prefix}self_attention", f"{prefix}mlp.0"]
    return out


def _nothing_found(model: nn.Module) -> str:
    """One line: what the model holds, and how to name sites by hand."""
    kinds = Counter(type(m).__name__ for m in model.modules() if m is not model)
    found = ", ".join(f"{k} x{n}" for k, n in kinds.most_common(8)) or "no submodules"
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:3]
    example = layers or ["layer1.0.conv1"]
    return (f"attach_sites: no residual or transformer block recognised in {type(model).__name__} (it holds {found}); "
            f"pass the layers whose input APART perturbs, e.g. attach_sites(model, {example}) or --apart-sites "
            f"{','.join(example)}, or train without layer-wise perturbation (--no-apart-layer-perturb; in Python "
            "ApartConfig(layer_perturb=False))")


def site_names(model: nn.Module) -> list[str]:
    """Where each site of ``model`` acts, in ``find_sites`` order: the hooked layer's name for an attached
    site, the site's own name for a marked one."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, AttachedSite):
            out.append(name.rpartition(".")[0] if name != SITE_NAME else "")
        elif isinstance(m, PerturbSite):
            out.append(name)
    return out


def attach_sites(model: nn.Module, sites: str | Sequence[str] = "auto") -> list[str]:
    """Hook a site onto the input of each layer of ``sites`` (``"auto"``: the module docstring's rules; a
    comma-separated string or a list: module names); returns ``site_names(model)``.

    Idempotent: a layer that already has an attached site keeps it, and ``"auto"`` on a model with sites
    attaches nothing. Raises ValueError (one line) when ``"auto"`` recognises no block, for an unknown
    name, and for names on a model that marks its own sites.
    """
    if isinstance(sites, str):
        names = ["auto"] if sites.strip() == "auto" else [s.strip() for s in sites.split(",") if s.strip()]
    else:
        names = list(sites)
    if not names:
        raise ValueError(f"attach_sites: no layer named in {sites!r}; pass 'auto' or module names such as layer1.0.conv1")
    existing = find_sites(model)
    if names == ["auto"]:
        if existing:
            return site_names(model)
        names = auto_targets(model)
        if not names:
            raise ValueError(_nothing_found(model))
    elif any(not isinstance(s, AttachedSite) for s in existing):
        raise ValueError(f"attach_sites: {type(model).__name__} already marks {len(existing)} PerturbSite modules; "
                         "use them (sites='auto') instead of naming layers, so that no activation is perturbed twice")
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"attach_sites: the model has no module {name!r}{hint}; pass names from model.named_modules()")
    for name in names:
        layer = modules[name]
        if isinstance(layer._modules.get(SITE_NAME), AttachedSite):
            continue
        site = AttachedSite()
        layer.add_module(SITE_NAME, site)
        site.hook(layer)
    return site_names(model)


__all__ = ["SITE_NAME", "AttachedSite", "attach_sites", "auto_targets", "site_names"]
