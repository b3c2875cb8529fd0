"""Models: construction, forward shapes, layer blocks and named groups."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from fedlayer.config import MODELS, NORMS, ConfigError
from fedlayer.models import MODEL_CLASSES, NORM_TYPES, build_model, model_blocks, model_groups

COMBOS = [("mlp", "none")] + [(m, n) for m in ("cnn", "pfllib_cnn", "resnet18", "vgg11") for n in NORMS]
INPUTS = [(1, 28), (3, 32)]  # (channels, size): MNIST-like and CIFAR-like
HEADS = {"cnn": ["fc2"], "pfllib_cnn": ["fc2"], "mlp": ["fc3"], "resnet18": ["fc"], "vgg11": ["classifier.4"]}
combos = pytest.mark.parametrize(("name", "norm"), COMBOS, ids=[f"{m}-{n}" for m, n in COMBOS])
inputs = pytest.mark.parametrize(("channels", "size"), INPUTS, ids=[f"{c}x{s}x{s}" for c, s in INPUTS])


@cache
def model(name: str, norm: str, channels: int = 3, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, channels, size, norm)


def test_registry_matches_config() -> None:
    assert tuple(MODEL_CLASSES) == MODELS


@combos
@inputs
def test_blocks_partition_the_state_dict_in_order(name: str, norm: str, channels: int, size: int) -> None:
    m = model(name, norm, channels, size)
    blocks = model_blocks(m)
    assert [key for keys in blocks.values() for key in keys] == list(m.state_dict())
    for block, keys in blocks.items():
        assert all(key.rpartition(".")[0] == block for key in keys)


@combos
@inputs
def test_forward_shape(name: str, norm: str, channels: int, size: int) -> None:
    out = model(name, norm, channels, size)(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)


@combos
def test_groups_head_body_partition_blocks_and_norm_is_by_type(name: str, norm: str) -> None:
    m = model(name, norm)
    blocks, groups = list(model_blocks(m)), model_groups(m)
    assert groups["head"] == HEADS[name]
    assert sorted(groups["head"] + groups["body"]) == sorted(blocks)
    assert not set(groups["head"]) & set(groups["body"])
    assert groups["body"] == [b for b in blocks if b not in HEADS[name]]  # keeps block order
    modules = dict(m.named_modules())
    expected_norm = [b for b in blocks if isinstance(modules[b], nn.BatchNorm2d | nn.GroupNorm)]
    assert groups["norm"] == expected_norm
    assert bool(groups["norm"]) == (norm != "none")


def test_cnn_and_mlp_are_the_fedavg_models() -> None:
    """McMahan et al. (2017) report 1,663,370 (CNN) and 199,210 (2NN) parameters on 28x28 inputs."""
    cnn, mlp = model("cnn", "none", 1, 28), model("mlp", "none", 1, 28)
    assert list(model_blocks(cnn)) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(model_blocks(mlp)) == ["fc1", "fc2", "fc3"]
    assert sum(p.numel() for p in cnn.parameters()) == 1_663_370
    assert sum(p.numel() for p in mlp.parameters()) == 199_210


def test_pfllib_cnn_is_pfllibs_fedavgcnn() -> None:
    """PFLlib's FedAvgCNN: unpadded 5x5 convs, fc 1024 -> 512 on 28x28x1: 582,026 parameters."""
    m = model("pfllib_cnn", "none", 1, 28)
    assert list(model_blocks(m)) == ["conv1", "conv2", "fc1", "fc2"]
    assert sum(p.numel() for p in m.parameters()) == 582_026
    assert (m.conv1.padding, m.fc1.in_features) == ((0, 0), 1024)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_batch_norm_group_has_every_batchnorm_incl_downsample() -> None:
    m = model("resnet18", "batch")
    batchnorms = [name for name, module in m.named_modules() if isinstance(module, nn.BatchNorm2d)]
    groups, blocks = model_groups(m), model_blocks(m)
    assert groups["norm"] == batchnorms
    assert len(batchnorms) == 20
    assert "layer2.0.downsample.1" in groups["norm"]
    assert "layer2.0.downsample.1" in groups["body"]
    assert blocks["layer1.0.bn1"] == [
        f"layer1.0.bn1.{t}" for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]


def test_resnet18_without_norm_has_no_norm_blocks_or_statistics() -> None:
    m = model("resnet18", "none")
    assert model_groups(m)["norm"] == []
    assert not any(isinstance(module, NORM_TYPES) for module in m.modules())
    assert not [k for k in m.state_dict() if "bn" in k or "running" in k or "downsample.1" in k]
    assert "layer2.0.downsample.0" in model_blocks(m)


def test_resnet18_group_norm_and_cifar_stem() -> None:
    m = model("resnet18", "group", 1, 28)
    assert isinstance(m.layer2[0].downsample[1], nn.GroupNorm)
    assert m.bn1.num_groups == 32
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.in_channels) == ((3, 3), (1, 1), 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert not [k for k in m.state_dict() if "running" in k]


@pytest.mark.parametrize("norm", NORMS)
def test_vgg11_features_are_named_like_torchvision(norm: str) -> None:
    """Block names match torchvision's vgg11 / vgg11_bn features (GroupNorm takes BatchNorm's slots)."""
    reference = make_layers(cfgs["A"], batch_norm=norm != "none")
    expected = [f"features.{k}" for k in model_blocks(reference)]
    for channels, size in INPUTS:
        blocks = list(model_blocks(model("vgg11", norm, channels, size)))
        assert [b for b in blocks if b.startswith("features.")] == expected


@combos
def test_construction_is_deterministic_under_the_seed(name: str, norm: str) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, 10, 3, 32, norm).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "norm", "message"),
    [
        (
            "resnet",
            "none",
            "model.name: 'resnet' is not allowed; choose one of: cnn, pfllib_cnn, mlp, resnet18, vgg11",
        ),
        ("vgg11", "layer", "model.norm: 'layer' is not allowed for vgg11; choose one of: none, batch, group"),
        ("mlp", "batch", "model.norm: 'batch' is not allowed for mlp; choose one of: none"),
    ],
)
def test_unknown_name_or_norm_is_a_one_line_config_error(name: str, norm: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(name, 10, 1, 28, norm)
    assert str(err.value) == message
