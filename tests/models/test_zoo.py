"""torchvision models by name (``--model torchvision:NAME``, ``--stem cifar``) and the project's small ViT:
shapes, stems, sites, rebuilding from ``model.config``, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from apart_fast.config import Config, ConfigError
from apart_fast.models import ViT, attach_sites, build_model, find_sites, model_from_config, torchvision_model
from apart_fast.models.zoo import FullPrecisionConv2d, Normalized


def test_resnet_cifar_stem_is_3x3_stride_1_without_max_pool():
    m = build_model("torchvision:resnet18", num_classes=7, in_channels=3, image_size=32, stem="cifar")
    assert isinstance(m, torchvision.models.ResNet) and isinstance(m.conv1, FullPrecisionConv2d)
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.bias) == ((3, 3), (1, 1), None)
    assert isinstance(m.maxpool, nn.Identity) and m.fc.out_features == 7
    assert m.config == {"name": "torchvision:resnet18", "kwargs": dict(num_classes=7, in_channels=3, image_size=32,
                                                                           stem="cifar", mean=None, std=None)}
    native = build_model("torchvision:resnet18", num_classes=7, in_channels=3, image_size=32)
    assert native.conv1.kernel_size == (7, 7) and isinstance(native.maxpool, nn.MaxPool2d)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        m.eval(), native.eval()
        assert m.layer1(m.relu(m.bn1(m.conv1(x)))).shape[-1] == 32  # full resolution into the first stage
        assert native(x).shape == (2, 7)


def test_rebuilt_from_config_with_grayscale_input_and_normalisation():
    m = torchvision_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.25])
    assert isinstance(m, Normalized) and m.net.conv1.in_channels == 1
    twin = model_from_config(m.config)
    twin.load_state_dict(m.state_dict())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), m.eval()(x))


def test_torchvision_vit_cifar_patch():
    small = torchvision_model("torchvision:vit_b_16", num_classes=10, image_size=32, stem="cifar")
    assert small.patch_size == 4 and small.seq_length == 65 and small.encoder.pos_embedding.shape == (1, 65, 768)
    assert isinstance(small.conv_proj, FullPrecisionConv2d) and small.conv_proj.stride == (4, 4)
    assert len(attach_sites(small)) == 24  # 12 encoder blocks, attention and MLP inputs


def test_torchvision_errors_are_one_line():
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet19'; .* e.g. resnet18"):
        build_model("torchvision:resnet19", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match=r"--width 16 does not apply to torchvision:resnet18"):
        build_model("torchvision:resnet18", num_classes=10, in_channels=3, width=16)
    with pytest.raises(ValueError, match=r"torchvision:squeezenet1_1 keeps its own stem: --stem cifar"):
        build_model("torchvision:squeezenet1_1", num_classes=10, in_channels=3, stem="cifar")
    with pytest.raises(ValueError, match=r"torchvision:vit_b_16 cannot be built for 40px images .* use --stem cifar"):
        build_model("torchvision:vit_b_16", num_classes=10, in_channels=3, image_size=40)
    with pytest.raises(ValueError, match=r"--stem cifar adapts torchvision: models; preact18"):
        build_model("preact18", num_classes=10, in_channels=3, stem="cifar")


@pytest.mark.parametrize("kw,needle", [
    (dict(model="torchvision"), "unknown model 'torchvision'; choose one of preact18, wrn34_10, smallcnn, vit or torchvision:NAME"),
    (dict(model="torchvision:"), "unknown model 'torchvision:'"),
    (dict(stem="cifar"), "--stem cifar adapts torchvision: models; smallcnn has a stem for small images already"),
    (dict(model="torchvision:resnet18", stem="big"), "--stem 'big'; choose one of native, cifar"),
])
def test_config_checks_model_and_stem(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        Config(**kw).validate()
    Config(model="torchvision:resnet18", stem="cifar").validate()


def test_small_vit_shapes_sites_and_config():
    m = build_model("vit", num_classes=10, in_channels=3, image_size=32)
    assert m.config["kwargs"]["width"] == 128 and len(m.blocks) == 6
    sites = find_sites(m)
    assert len(sites) == 12 and sites[0] is m.blocks[0].site_attn and sites[1] is m.blocks[0].site_mlp
    assert attach_sites(m) == [f"blocks.{i}.site_{s}" for i in range(6) for s in ("attn", "mlp")]  # marked: kept
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    twin = model_from_config(m.config)
    twin.load_state_dict(m.state_dict())
    torch.testing.assert_close(twin(x), m(x))
    assert build_model("vit", num_classes=10, in_channels=1, image_size=8, width=16)(torch.rand(1, 1, 8, 8)).shape == (1, 10)


def test_small_vit_errors():
    with pytest.raises(ValueError, match="patch 4 does not divide the image size 30"):
        ViT(image_size=30)
    with pytest.raises(ValueError, match="width 100 is not a multiple of heads 3"):
        ViT(width=100, heads=3)
