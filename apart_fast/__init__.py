"""apart_fast: APART adversarial training with fused perturbation kernels.

Public API: ``load_model``, ``train``, ``Config``, the methods (``apart_fast.methods``), the ops
(``apart_fast.ops``), the attacks (``apart_fast.attacks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torch import nn


def load_model(path: str, map_location: str = "cpu") -> nn.Module:
    """An eval-mode model from any checkpoint ``apart-fast train`` writes (model.pt or checkpoint.pt, of any format
    version), verified first. It takes float32 images in [0,1] of shape (N,C,H,W) and returns logits.

    Without apart_fast, ``torch.load(path, weights_only=True)["model"]`` is the state_dict (unverified).
    """
    from apart_fast.engine import checkpoint

    return model_from_payload(checkpoint.load(path, map_location=map_location), path)


def model_from_payload(state: dict[str, Any], path: str) -> nn.Module:
    """The eval-mode model held by a loaded checkpoint payload (``load_model`` without the read); ``path`` names it in errors.
    An APART run's sites are attached again (identity until a method arms them), so the model is the one it trained."""
    from apart_fast.engine import checkpoint
    from apart_fast.models import attach_sites, model_from_config

    if "model_config" not in state or "model" not in state:
        raise checkpoint.CheckpointError(f"{path} holds no model; pass model.pt or checkpoint.pt from apart-fast train")
    if state["model_config"] is None:
        raise checkpoint.CheckpointError(
            f"{path} holds the weights of a user-defined model (no model.config); rebuild your model and load them "
            f"with model.load_state_dict(apart_fast.engine.checkpoint.load({str(path)!r})['model'])")
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    run, apart = state.get("config") or {}, (state.get("config") or {}).get("apart") or {}
    if run.get("method") == "apart" and apart.get("layer_perturb", True):
        attach_sites(model, apart.get("sites", "auto"))  # the run's sites, hooked on again: the model it trained
    return model.eval()


def train(config: Any = None, *, model: nn.Module | None = None, **overrides: Any) -> dict[str, Any]:
    """Train with a ``Config`` (or keyword overrides of its fields; ``config`` itself is left as it is);
    returns results incl. the model.

    ``model``: your own model (float images in [0,1] -> logits) instead of ``config.model``; APART
    uses its ``PerturbSite`` markers or, without any, hooks sites onto its residual / transformer blocks
    (``apart_fast.models.attach_sites``; ``ApartConfig.sites`` names the layers for other models).
    Without a ``model.config`` attribute, model.pt holds its weights only (``load_model`` then asks
    you to rebuild the model and load them).
    """
    import dataclasses

    from apart_fast.config import Config, ConfigError
    from apart_fast.engine.loop import train as _train

    cfg = config if config is not None else Config()
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"train(): unknown setting {unknown[0]!r}; pass a field of apart_fast.config.Config "
                          "(e.g. epochs, method, lr)")
    return _train(dataclasses.replace(cfg, **overrides), model=model)


__all__ = ["__version__", "load_model", "train"]
