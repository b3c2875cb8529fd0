"""Selectors: pattern forms, exclusion, errors, and splitting / merging state dicts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedlayer.layers import Resolution, Selector, SelectorError, resolve
from fedlayer.models import build_model, model_groups


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", 10, 1, 28)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10, 3, 32, "batch")


def shared(model: nn.Module, *include: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return resolve(Selector(include, exclude), model).shared_blocks


def assert_partition(res: Resolution, model: nn.Module) -> None:
    keys = list(model.state_dict())
    assert res.shared_keys == [k for k in keys if k in set(res.shared_keys)]  # state-dict order
    assert res.personal_keys == [k for k in keys if k not in set(res.shared_keys)]


def test_glob_matches_whole_block_names(cnn: nn.Module, resnet: nn.Module) -> None:
    assert shared(cnn, "fc*") == ["fc1", "fc2"]
    assert shared(cnn, "conv1", "fc2") == ["conv1", "fc2"]
    assert shared(resnet, "conv*") == ["conv1"]  # not layer1.0.conv1: globs anchor at the start
    layer1 = shared(resnet, "layer1.*")
    assert len(layer1) == 8 and all(b.startswith("layer1.") for b in layer1)


def test_regex_is_a_full_match(cnn: nn.Module, resnet: nn.Module) -> None:
    assert shared(cnn, r"re:conv\d") == ["conv1", "conv2"]
    expected = [f"layer{i}.0.downsample.{j}" for i in (3, 4) for j in (0, 1)]
    assert shared(resnet, r"re:layer[34]\.0\.downsample\..*") == expected
    with pytest.raises(SelectorError, match="'re:conv' matches no block"):
        shared(cnn, "re:conv")


def test_type_matches_module_class_and_norm(cnn: nn.Module, resnet: nn.Module) -> None:
    assert shared(cnn, "type:Linear") == ["fc1", "fc2"]
    batchnorms = shared(resnet, "type:BatchNorm2d")
    assert batchnorms == model_groups(resnet)["norm"] == shared(resnet, "type:norm")
    assert "layer2.0.downsample.1" in batchnorms and len(batchnorms) == 20
    assert shared(resnet, "type:_BatchNorm") == batchnorms  # base classes match too


def test_groups_with_and_without_prefix(cnn: nn.Module, resnet: nn.Module) -> None:
    assert shared(cnn, "group:head") == shared(cnn, "head") == ["fc2"]
    assert shared(cnn, "body") == ["conv1", "conv2", "fc1"]
    assert shared(resnet, "group:norm") == model_groups(resnet)["norm"]
    assert sorted(shared(resnet, "head") + shared(resnet, "body")) == sorted(shared(resnet, "*"))


def test_fedbn_exclusion_keeps_norm_blocks_and_their_buffers_personal(resnet: nn.Module) -> None:
    res = resolve(Selector(["*"], ["type:norm"]), resnet)
    assert res.personal_blocks == model_groups(resnet)["norm"]
    ds = "layer2.0.downsample.1"
    assert {f"{ds}.{t}" for t in ("weight", "running_mean", "num_batches_tracked")} <= set(res.personal_keys)
    assert not [k for k in res.shared_keys if "running" in k or "num_batches" in k]
    assert_partition(res, resnet)


def test_exclude_can_empty_the_include_and_empty_include_shares_nothing(cnn: nn.Module) -> None:
    assert shared(cnn, "fc1", exclude=("fc*",)) == []
    res = resolve(Selector(), cnn)
    assert res.shared_keys == [] and res.personal_keys == list(cnn.state_dict())


def test_keys_are_in_state_dict_order_and_partition_it(resnet: nn.Module) -> None:
    res = resolve(Selector(["body"], ["layer1.*"]), resnet)
    assert_partition(res, resnet)
    assert res.personal_blocks[:2] == ["layer1.0.conv1", "layer1.0.bn1"]
    assert res.personal_blocks[-1] == "fc"


CNN_BLOCKS = "blocks are: conv1, conv2, fc1, fc2"
KINDS = "use a glob (e.g. 'fc*'), 're:<regex>', 'type:<ModuleClass>' or 'group:<head|body|norm>'"
ERRORS = [
    (["clasifier.*"], [], f"strategy.shared: pattern 'clasifier.*' matches no block of cnn; {CNN_BLOCKS}"),
    (["*"], ["fc9"], f"strategy.exclude: pattern 'fc9' matches no block of cnn; {CNN_BLOCKS}"),
    (["group:heads"], [], "strategy.shared: unknown group 'heads'; groups are: head, body, norm"),
    (
        ["type:BatchNorm2d"],
        [],
        "strategy.shared: pattern 'type:BatchNorm2d' matches no block of cnn; "
        "block types are: Conv2d, Linear",
    ),
    (
        ["*"],
        ["type:norm"],
        "strategy.exclude: pattern 'type:norm' matches no block of cnn; its group 'norm' is empty",
    ),
    (
        ["fc*"],
        ["fc*"],
        "strategy.exclude: pattern 'fc*' is also in strategy.shared; "
        "a pattern cannot be both shared and excluded",
    ),
    (["typ:Linear"], [], f"strategy.shared: pattern 'typ:Linear' has an unknown kind 'typ:'; {KINDS}"),
]


@pytest.mark.parametrize(("include", "exclude", "message"), ERRORS)
def test_errors_are_one_line_naming_the_field(
    cnn: nn.Module, include: list[str], exclude: list[str], message: str
) -> None:
    with pytest.raises(SelectorError) as err:
        resolve(Selector(include, exclude), cnn)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_invalid_regex_and_custom_field(cnn: nn.Module) -> None:
    with pytest.raises(SelectorError, match=r"^analysis\.blocks: pattern 're:\(' is not a valid regular"):
        resolve(Selector(["re:("]), cnn, field="analysis.blocks")


def test_selector_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError, match="sequence of patterns"):
        Selector("fc*")
    assert Selector(["a"], ["b"]) == Selector(("a",), ("b",))  # lists are stored as tuples: hashable


def test_describe_and_json(cnn: nn.Module) -> None:
    res = resolve(Selector(["body"]), cnn)
    assert res.describe().splitlines() == [
        "shared (3 blocks, 1,658,240 params): conv1, conv2, fc1",
        "personal (1 block, 5,130 params): fc2",
    ]
    data = json.loads(json.dumps(res.to_json()))
    assert data["shared_keys"] == res.shared_keys and data["personal_blocks"] == ["fc2"]
    assert data["include"] == ["body"] and data["model"] == "cnn"
