"""Shared fixtures: tiny datasets in the real on-disk formats, so the real loaders run."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def learnable_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images whose class is visible (a bright band at a class-dependent row) plus noise."""
    images = rng.integers(0, 60, size=(len(labels), size, size), dtype=np.uint8)
    rows = (labels * (size // 10)).astype(int)
    for offset in range(2):
        images[np.arange(len(labels)), rows + offset, :] = 230
    return images


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (magic 0x08, ndim) as MNIST/Fashion-MNIST ship them."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fmnist(root: Path, n_train: int, n_test: int, seed: int = 0, folder: str = "FashionMNIST") -> Path:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images_file, labels_file = FMNIST_FILES[split]
        write_idx(raw / images_file, learnable_images(labels, 28, rng))
        write_idx(raw / labels_file, labels)
    return root


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a 600/200-sample Fashion-MNIST in torchvision's raw IDX layout."""
    return write_fmnist(tmp_path_factory.mktemp("data"), n_train=600, n_test=200)


@pytest.fixture(scope="session")
def uninterrupted(tiny_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run of ``sim_helpers.cli_args``, once, uninterrupted: the reference that the determinism and
    interruption tests compare with (one simulation fewer each)."""
    from sim_helpers import cli_args, run

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(cli_args(tiny_fmnist, out))
    return out
