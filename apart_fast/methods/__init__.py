"""Training methods behind one interface: clean, fgsm, fgsm_rs, nfgsm, gradalign, free, pgd, apart."""

from __future__ import annotations

from apart_fast.methods.apart import Apart
from apart_fast.methods.base import DataInfo, Method
from apart_fast.methods.clean import Clean
from apart_fast.methods.fgsm import FGSM, FGSMRS
from apart_fast.methods.free import Free
from apart_fast.methods.gradalign import GradAlign
from apart_fast.methods.nfgsm import NFGSM
from apart_fast.methods.pgd import PGD

METHOD_CLASSES: dict[str, type[Method]] = {c.name: c for c in (Clean, FGSM, FGSMRS, NFGSM, GradAlign, Free, PGD, Apart)}


def build_method(name: str, *args, **kwargs) -> Method:
    """The method called ``name``, built from (model, cfg, info, device)."""
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](*args, **kwargs)


__all__ = ["FGSM", "FGSMRS", "NFGSM", "PGD", "GradAlign", "Apart", "Clean", "DataInfo", "Free", "METHOD_CLASSES", "Method", "build_method"]
