"""Feature shift (``data.feature_shift``): per-client domains, applied once to train and test alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from fedlayer.config import ConfigError, load_config
from fedlayer.data.shift import CORRUPTIONS, FeatureShift, _warp, assign_domains, smooth
from fedlayer.experiment import FederatedData, federated_data, release_data

IMAGES = torch.rand(6, 1, 28, 28)


def data(root: Path, *overrides: str) -> FederatedData:
    sets = [f"data.root='{root}'", "data.min_partition_size=5", "federation.clients=6", *overrides]
    release_data()  # a fresh build: determinism must not come from the cache
    return federated_data(load_config(None, sets))


@pytest.mark.parametrize(("kind", "domains"), [("rotate", 4), ("corrupt", 6)])
def test_severity_0_and_domain_0_are_the_identity(kind: str, domains: int) -> None:
    for domain in range(domains):
        assert FeatureShift(kind, domains, 0.0, seed=0).apply(IMAGES, domain) is IMAGES
    assert FeatureShift(kind, domains, 1.0, seed=0).apply(IMAGES, 0) is IMAGES


def test_every_corruption_changes_the_images_deterministically() -> None:
    shift = FeatureShift("corrupt", 6, 1.0, seed=3)
    for domain, name in enumerate(CORRUPTIONS[1:], start=1):
        out = shift.apply(IMAGES, domain)
        assert out.shape == IMAGES.shape and out.min() >= 0 and out.max() <= 1, name
        assert not torch.equal(out, IMAGES), name
        assert torch.equal(out, FeatureShift("corrupt", 6, 1.0, seed=3).apply(IMAGES, domain)), name
    assert not torch.equal(shift.apply(IMAGES, 1), FeatureShift("corrupt", 6, 1.0, seed=4).apply(IMAGES, 1))


def test_rotations_are_quarter_turns_at_full_severity() -> None:
    shift = FeatureShift("rotate", 4, 1.0, seed=0)
    assert shift.names() == ["rotate 0°", "rotate 90°", "rotate 180°", "rotate 270°"]
    for k in range(4):
        assert torch.equal(shift.apply(IMAGES, k), torch.rot90(IMAGES, k, dims=(-2, -1)))
    half = FeatureShift("rotate", 4, 0.5, seed=0)
    assert half.names()[1] == "rotate 45°"
    expected = F.rotate(IMAGES, 45.0, F.InterpolationMode.BILINEAR, fill=[0.0])
    assert torch.allclose(half.apply(IMAGES, 1), expected)


def test_batched_elastic_and_smoothing_equal_torchvision() -> None:
    displacement = 0.1 * torch.randn(6, 28, 28, 2, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([F.elastic(IMAGES[i], displacement[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(_warp(IMAGES, displacement), expected)
    torch.testing.assert_close(smooth(IMAGES, 4.0), F.gaussian_blur(IMAGES, [33, 33], [4.0, 4.0]))


def test_assignment_is_balanced_round_robin_or_a_seeded_shuffle() -> None:
    assert assign_domains(6, 4, "round_robin", 0).tolist() == [0, 1, 2, 3, 0, 1]
    drawn = assign_domains(10, 4, "random", 0)
    assert sorted(drawn.tolist()) == sorted(assign_domains(10, 4, "round_robin", 0).tolist())
    assert np.array_equal(drawn, assign_domains(10, 4, "random", 0))


def test_domains_are_applied_to_train_and_test_alike(tiny_fmnist: Path) -> None:
    plain = data(tiny_fmnist)
    shifted = data(tiny_fmnist, "data.feature_shift='rotate'")
    assert plain.domains is None and shifted.domains is not None
    for pid, domain in enumerate(shifted.domains.clients):
        for before, after in zip(plain.client(pid), shifted.client(pid), strict=True):
            assert torch.equal(after.x, torch.rot90(before.x, int(domain), dims=(-2, -1)))
            assert torch.equal(after.y, before.y)


def test_the_same_config_gives_the_same_images(tiny_fmnist: Path) -> None:
    first = data(tiny_fmnist, "data.feature_shift='corrupt'", "data.domains=6", "data.severity=0.7")
    again = data(tiny_fmnist, "data.feature_shift='corrupt'", "data.domains=6", "data.severity=0.7")
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.x, again.test.x)


def test_the_global_test_set_holds_every_domain(tiny_fmnist: Path) -> None:
    """pool = train: the dataset's test image j in domain j mod domains (each image turned as its domain)."""
    plain = data(tiny_fmnist, "data.max_test_samples=150")
    shifted = data(tiny_fmnist, "data.feature_shift='rotate'", "data.max_test_samples=150")
    assert shifted.domains is not None
    assert shifted.domains.test.tolist() == [j % 4 for j in range(150)]
    for j in (0, 1, 2, 3, 149):
        assert torch.equal(shifted.test.x[j], torch.rot90(plain.test.x[j], j % 4, dims=(-2, -1)))


def test_pooled_global_test_set_is_the_union_of_the_shifted_local_tests(tiny_fmnist: Path) -> None:
    fed = data(tiny_fmnist, "data.pool='train+test'", "data.feature_shift='corrupt'", "data.domains=3")
    assert fed.domains is not None
    local = torch.cat([fed.client(pid)[1].x for pid in range(6)])
    assert sorted(map(tuple, fed.test.x.flatten(1).tolist())) == sorted(map(tuple, local.flatten(1).tolist()))
    sizes = np.array([len(s.test_idx) for s in fed.splits])
    per_domain = np.bincount(fed.domains.test, minlength=3)
    assert per_domain.tolist() == [int(sizes[fed.domains.clients == k].sum()) for k in range(3)]


def test_partition_json_records_every_clients_domain(tiny_fmnist: Path, tmp_path: Path) -> None:
    fed = data(tiny_fmnist, "data.feature_shift='rotate'", "data.domain_assignment='random'")
    fed.write_partition_report(tmp_path, "dirichlet")
    report = json.loads((tmp_path / "partition.json").read_text())
    assert fed.domains is not None
    assert [c["domain"] for c in report["clients"]] == fed.domains.clients.tolist()
    shift = report["feature_shift"]
    assert shift["names"][1] == "rotate 90°" and sum(shift["clients_per_domain"]) == 6
    assert sum(shift["global_test_per_domain"]) == len(fed.test)
    assert all(len(bytes.fromhex(sample)) == 28 * 28 for sample in shift["samples"])
    assert (tmp_path / "partition.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["data.feature_shift='corrupt'", "data.domains=7"], "data.domains: 7 is not allowed; must be <= 6"),
        (["data.feature_shift='rotate'", "data.domains=11"], "must be <= federation.clients=10"),
        (["data.feature_shift='blur'"], "data.feature_shift: 'blur' is not allowed; choose one of: none"),
        (["data.severity=2"], "data.severity: 2.0 is not allowed; must be in [0, 1]"),
    ],
)
def test_bad_feature_shift_values_name_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
