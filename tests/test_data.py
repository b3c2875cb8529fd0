"""Dataset sources and loading: tiny files in the real on-disk formats, read through torchvision."""

from __future__ import annotations

import gzip
import pickle
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets as tv

from fedlayer.data import DataError, TensorData, find_data_root, load_dataset, sources

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 30, "test": 12}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user environment, no Debian package, a private cache, and no network."""
    monkeypatch.delenv("FEDLAYER_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")

    def no_network(self: object) -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(tv.MNIST, "download", no_network)  # FashionMNIST inherits it
    monkeypatch.setattr(tv.CIFAR10, "download", no_network)  # CIFAR100 inherits it


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (magic 0x0800 + ndim, big-endian dims), as (Fashion-)MNIST ship them."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, gz: bool, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four IDX files into ``folder``; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images_name, labels_name) in IDX_NAMES.items():
        images = rng.integers(0, 256, size=(SIZES[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=SIZES[split], dtype=np.uint8)
        for name, array in ((images_name, images), (labels_name, labels)):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[split] = (images, labels)
    return written


def write_cifar(root: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """CIFAR python pickles; every image has constant channel values (R, G, B) = (200, 100, 0) + label."""
    cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(1)
    written = {}
    for file_name, _ in cls.train_list + cls.test_list:
        labels = rng.integers(0, 10, size=7)
        planes = np.array([200, 100, 0])[None, :, None] + labels[:, None, None]  # (n, 3, 1)
        data = np.broadcast_to(planes, (7, 3, 1024)).reshape(7, 3072).astype(np.uint8)  # CHW rows
        (folder / file_name).write_bytes(pickle.dumps({"data": data, key: labels.tolist()}))
        written[file_name] = labels
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: [str(i) for i in range(10)]}))
    # The tiny files cannot match the real checksums torchvision verifies.
    monkeypatch.setattr(cls, "train_list", [[f, None] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, None] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    return written


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(("name", "folder"), [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_files_load_through_torchvision(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    written = write_idx_set(tmp_path / "root" / folder / "raw", gz=gz)
    train, test = load_dataset(name, str(tmp_path / "root"), download=False)
    mean, std = sources.SPECS[name].mean[0], sources.SPECS[name].std[0]
    for data, split in ((train, "train"), (test, "test")):
        images, labels = written[split]
        assert data.x.shape == (SIZES[split], 1, 28, 28) and data.x.dtype == torch.float32
        assert data.y.dtype == torch.int64 and data.y.tolist() == labels.tolist()
        expected = (torch.from_numpy(images).float().div(255) - mean) / std
        assert torch.allclose(data.x[:, 0], expected, atol=1e-5)
        assert data.num_classes == 10 and len(data) == SIZES[split]
        assert data.classes == tuple(sources.SPECS[name].cls.classes)  # "T-shirt/top", ... / "0 - zero", ...


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load_channels_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    written = write_cifar(tmp_path, name, monkeypatch)
    train, test = load_dataset(name, str(tmp_path), download=False)
    spec = sources.SPECS[name]
    labels = np.concatenate([written[f] for f, _ in spec.cls.train_list])
    assert train.x.shape == (len(labels), 3, 32, 32) and test.x.shape == (7, 3, 32, 32)
    assert train.y.tolist() == labels.tolist() and train.num_classes == (10 if name == "cifar10" else 100)
    assert train.classes == tuple(str(i) for i in range(10))  # the names in the meta file
    for channel, base in enumerate((200, 100, 0)):
        expected = ((base + train.y.float()) / 255 - spec.mean[channel]) / spec.std[channel]
        assert torch.allclose(train.x[:, channel].amax(dim=(1, 2)), expected, atol=1e-5)
        assert torch.allclose(train.x[:, channel].amin(dim=(1, 2)), expected, atol=1e-5)


def test_corrupt_cifar_is_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / tv.CIFAR10.base_folder
    folder.mkdir()
    for file_name, _ in [*tv.CIFAR10.train_list, *tv.CIFAR10.test_list]:
        (folder / file_name).write_bytes(b"not a pickle")
    (folder / tv.CIFAR10.meta["filename"]).write_bytes(b"")
    with pytest.raises(DataError, match=r"cifar10 under .* could not be read"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_loaded_tensors_are_cached_in_process(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=False)
    first = load_dataset("fashion_mnist", str(tmp_path), download=False)
    assert load_dataset("fashion_mnist", str(tmp_path), download=False) is first


def test_subset_takes_samples_in_order() -> None:
    names = tuple("abcdefg")
    data = TensorData(torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5), num_classes=7, classes=names)
    for idx in (np.array([3, 1]), torch.tensor([3, 1]), np.array([3, 1], dtype=np.int32)):
        sub = data.subset(idx)
        assert sub.y.tolist() == [3, 1] and sub.x.flatten().tolist() == [3.0, 1.0] and sub.num_classes == 7
        assert sub.classes == names
    assert len(data.subset(np.array([], dtype=np.int64))) == 0
    assert TensorData.concat([data, data]).classes == names  # pooled train + test keep the names


def test_env_root_is_used_when_no_root_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "env" / "MNIST" / "raw", gz=False)
    monkeypatch.setenv("FEDLAYER_DATA", str(tmp_path / "env"))
    assert find_data_root("mnist") == tmp_path / "env"


def test_explicit_root_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for root in ("env", "explicit"):
        write_idx_set(tmp_path / root / "MNIST" / "raw", gz=False)
    monkeypatch.setenv("FEDLAYER_DATA", str(tmp_path / "env"))
    assert find_data_root("mnist", str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_debian_files_are_unpacked_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_idx_set(tmp_path / "debian", gz=True)  # the package ships the four .gz side by side
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("FEDLAYER_DATA", str(tmp_path / "empty"))  # set but without the data: falls through
    root = find_data_root("fashion_mnist")
    assert root == tmp_path / "xdg" / "fedlayer" / "data"
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(
        n for names in IDX_NAMES.values() for n in names
    )
    train, _ = load_dataset("fashion_mnist")
    assert train.y.tolist() == written["train"][1].tolist()


def test_env_data_wins_over_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "debian", gz=True)
    write_idx_set(tmp_path / "env" / "FashionMNIST" / "raw", gz=False, seed=1)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("FEDLAYER_DATA", str(tmp_path / "env"))
    assert find_data_root("fashion_mnist") == tmp_path / "env"


def test_debian_path_serves_only_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "debian", gz=True)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(DataError, match="mnist not found"):
        find_data_root("mnist", download=False)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_missing_dataset_names_all_three_sources(name: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, download=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.dataset: {name} not found")
    assert "$FEDLAYER_DATA (unset)" in message
    assert "Debian dataset path" in message and "apt-get install dataset-fashion-mnist" in message
    assert "download failed (download=False)" in message


def test_failed_download_is_reported_with_its_reason_and_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float | None] = []

    def failing_download(self: object) -> None:
        seen.append(socket.getdefaulttimeout())
        raise RuntimeError("Error downloading x:\nTried https://mirror, got:\nName or service not known\n")

    monkeypatch.setattr(tv.CIFAR10, "download", failing_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match=r"download failed \(Error downloading x: Tried https://mirror, got"):
        find_data_root("cifar100")
    assert seen == [sources.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_missing_explicit_root_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root: mnist not found in .*MNIST/raw/"):
        find_data_root("mnist", str(tmp_path), download=False)


def test_unknown_dataset_lists_the_allowed_names() -> None:
    with pytest.raises(DataError, match="data.dataset: 'svhn' is not allowed; choose one of: fashion_mnist"):
        load_dataset("svhn")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no dataset-fashion-mnist")
def test_real_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", Path("/usr/share/datasets/fashion-mnist"))
    start = time.perf_counter()
    train, test = load_dataset("fashion_mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 1, 28, 28) and torch.bincount(train.y).tolist() == [6000] * 10
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01  # the usual mean/std
    assert time.perf_counter() - start < 30
