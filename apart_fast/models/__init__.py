"""Models for APART training: every model takes images in [0, 1] and marks its perturbation sites.

Models: :class:`PreActResNet18` (the paper's, 8 sites), :class:`WideResNet` / :func:`wrn34_10`
(15 sites), :class:`SmallCNN` (2 sites, fast on a CPU), :class:`ViT` (a small pre-norm transformer,
2 sites per block, see ``vit.py``), and torchvision's classification models by name
(``torchvision:resnet18``, :func:`torchvision_model`); :func:`build_model` builds one by name and
``model.config`` + :func:`model_from_config` rebuild it from a checkpoint. :class:`Normalize` sits
first in every model (``mean=None``: no normalisation, as in the APART script).

Marking sites in your own model
-------------------------------
APART perturbs, in every residual block, the activation the block feeds to its first convolution.
Insert a :class:`PerturbSite` module on exactly that activation, and make the block's shortcut take
the *unperturbed* input (a projection shortcut reads the activation before the site)::

    class MyBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1, self.site = nn.BatchNorm2d(cin), PerturbSite()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride, cin) != (1, cout) else None
            ...

        def forward(self, x):
            a = F.relu(self.bn1(x))
            skip = self.proj(a) if self.proj is not None else x   # before the site
            out = self.site(a, self.conv1)                        # perturbed path: conv1(site(a))
            ...

``self.site(a, self.conv1)`` computes ``self.conv1(self.site(a))``; given the (bias-free) layer, the
site keeps the perturbation exact under bf16/fp16 autocast (see ``sites.py``); ``self.conv1(self.site(a))``
works too, but under autocast a small step size is rounded away. A site is the identity until a method
arms it; :func:`find_sites` returns the sites of a model in forward (registration) order, which is the
order methods use for their per-block step sizes.

A model you cannot (or would rather not) edit: :func:`attach_sites` hooks the sites on from outside
(``attach.py``: torchvision's ResNet blocks and ViT encoder blocks, WideResNet/PreAct blocks, or any
layers you name); APART calls it itself for a model without sites.
"""

from apart_fast.models.attach import attach_sites, site_names
from apart_fast.models.blocks import Normalize, PreActBlock
from apart_fast.models.nets import (
    MODEL_NAMES,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    model_from_config,
    wrn34_10,
)
from apart_fast.models.sites import PerturbSite, applying, find_sites, recording
from apart_fast.models.vit import ViT
from apart_fast.models.zoo import torchvision_model

__all__ = [
    "MODEL_NAMES",
    "Normalize",
    "PerturbSite",
    "PreActBlock",
    "PreActResNet18",
    "SmallCNN",
    "ViT",
    "WideResNet",
    "applying",
    "attach_sites",
    "build_model",
    "find_sites",
    "model_from_config",
    "recording",
    "site_names",
    "torchvision_model",
    "wrn34_10",
]
