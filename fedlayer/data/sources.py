"""Whole datasets as normalized in-memory tensors, read by torchvision from offline or downloaded sources."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tv

from fedlayer.config import ConfigError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation: no internet must fail fast, not hang


class DataError(ConfigError):
    """A dataset or partitioning request that cannot be met; the message is one line naming the key."""


@dataclass(frozen=True)
class TensorData:
    """A whole dataset in memory.

    Attributes
    ----------
    x : torch.Tensor
        float32 images (N, C, H, W), normalized with the dataset's usual per-channel mean/std.
    y : torch.Tensor
        int64 labels (N,).
    num_classes : int
        Number of classes of the dataset (not only those present in this subset).
    classes : tuple[str, ...]
        The class names, label order ("T-shirt/top", "Trouser", ...); empty where the source has none.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @staticmethod
    def concat(parts: list[TensorData]) -> TensorData:
        """The samples of ``parts`` one after the other (e.g. a training and a test set pooled)."""
        first = parts[0]
        return TensorData(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), first.num_classes, first.classes
        )

    def subset(self, idx: np.ndarray | torch.Tensor) -> TensorData:
        """The samples at positions ``idx`` (a copy), in that order."""
        index = torch.as_tensor(np.asarray(idx) if isinstance(idx, np.ndarray) else idx, dtype=torch.long)
        return TensorData(self.x[index], self.y[index], self.num_classes, self.classes)


@dataclass(frozen=True)
class _Spec:
    cls: type[tv.MNIST] | type[tv.CIFAR10]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    size: int  # image height = width
    classes: tuple[str, ...]  # in label order


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine labels, in the order of the dataset's meta file (alphabetical).
CIFAR100_CLASSES = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
    cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
    lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()  # noqa: SIM905 -- 100 names stay readable as one string
)
# The per-channel statistics of each training set, as commonly used.
SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec(tv.FashionMNIST, (0.2860,), (0.3530,), 10, 28, tuple(tv.FashionMNIST.classes)),
    "mnist": _Spec(tv.MNIST, (0.1307,), (0.3081,), 10, 28, tuple(tv.MNIST.classes)),
    "cifar10": _Spec(tv.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 32, CIFAR10_CLASSES),
    "cifar100": _Spec(
        tv.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, 32, CIFAR100_CLASSES
    ),
}


def cache_root() -> Path:
    """Writable root for unpacked and downloaded data: ``$XDG_CACHE_HOME/fedlayer/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedlayer" / "data"


def _spec(name: str) -> _Spec:
    if name not in SPECS:
        raise DataError(f"data.dataset: {name!r} is not allowed; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


def _normalization(name: str, normalize: str) -> _Spec:
    """``name``'s spec with the mean/std of ``data.normalize`` (``half``: 0.5 and 0.5, PFLlib)."""
    spec = _spec(name)
    if normalize == "half":
        return dataclasses.replace(spec, mean=(0.5,) * len(spec.mean), std=(0.5,) * len(spec.std))
    return spec


def _folder(spec: _Spec, root: Path) -> Path:
    """Where torchvision looks for the files under ``root``."""
    if issubclass(spec.cls, tv.MNIST):
        return root / spec.cls.__name__ / "raw"
    return root / spec.cls.base_folder


def _files(spec: _Spec, root: Path) -> list[Path]:
    folder = _folder(spec, root)
    if issubclass(spec.cls, tv.MNIST):
        return [folder / Path(name).stem for name, _ in spec.cls.resources]  # torchvision reads them unpacked
    names = [name for name, _ in spec.cls.train_list + spec.cls.test_list] + [spec.cls.meta["filename"]]
    return [folder / name for name in names]


def _present(spec: _Spec, root: Path) -> bool:
    return all(f.exists() or f.with_name(f.name + ".gz").exists() for f in _files(spec, root))


def _unpack(files: list[Path], source: Path) -> None:
    """Gunzip ``source/<name>.gz`` to each missing file (atomic rename: Ray actors may race here)."""
    for target in files:
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with gzip.open(source / f"{target.name}.gz", "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)


def _ready(spec: _Spec, root: Path) -> Path:
    """``root`` after unpacking any gzipped IDX files in place."""
    files = _files(spec, root)
    _unpack(files, files[0].parent)
    return root


def _download(spec: _Spec, root: Path) -> str:
    """Download with torchvision into ``root``; returns "" on success, else a one-line reason. A failed
    download leaves nothing behind: the folders it created (torchvision makes them first) are removed."""
    folder = _folder(spec, root)
    new = next((p for p in (*reversed(folder.parents), folder) if not p.exists()), None)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        spec.cls(str(root), train=True, download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ... for the same cause
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        return " ".join(str(err).split())[:300] or type(err).__name__
    finally:
        socket.setdefaulttimeout(previous)
    return ""


def find_data_root(name: str, root: str = "", *, download: bool = True) -> Path:
    """Find (or make) a root directory holding ``name`` in torchvision's on-disk layout.

    Parameters
    ----------
    name : str
        One of ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``.
    root : str
        Explicit root (``data.root``); "" looks in ``$FEDLAYER_DATA``, then (Fashion-MNIST only) the Debian
        package path, whose files are unpacked into :func:`cache_root`, then downloads into the cache root.
    download : bool
        Whether a torchvision download may be attempted as the last resort.

    Raises
    ------
    DataError
        If no source holds the dataset; the one-line message names every source tried.
    """
    spec = _spec(name)
    expected = _folder(spec, Path("<root>"))
    if root:
        return _explicit_root(name, spec, Path(root).expanduser(), download)
    env = os.environ.get("FEDLAYER_DATA", "")
    if env and _present(spec, Path(env).expanduser()):
        return _ready(spec, Path(env).expanduser())
    cache = cache_root()
    debian = DEBIAN_FASHION_MNIST
    if name == "fashion_mnist" and all((debian / f"{f.name}.gz").exists() for f in _files(spec, cache)):
        _unpack(_files(spec, cache), debian)
        return cache
    if _present(spec, cache):
        return _ready(spec, cache)
    reason = _download(spec, cache) if download else "download=False"
    if not reason:
        return cache
    deb = (
        f"the Debian dataset path {debian} (not installed: apt-get install dataset-fashion-mnist)"
        if name == "fashion_mnist"
        else "the Debian dataset path (only fashion_mnist: apt-get install dataset-fashion-mnist)"
    )
    raise DataError(
        f"data.dataset: {name} not found in $FEDLAYER_DATA ({env or 'unset'}), {deb}, "
        f"and download failed ({reason}); place it as {expected} and set data.root or $FEDLAYER_DATA"
    )


def _explicit_root(name: str, spec: _Spec, root: Path, download: bool) -> Path:
    if _present(spec, root):
        return _ready(spec, root)
    reason = _download(spec, root) if download else "download=False"
    if not reason:
        return root
    raise DataError(
        f"data.root: {name} not found in {root} (expected {_folder(spec, root)}/), "
        f"and download failed ({reason})"
    )


def load_dataset(
    name: str, root: str = "", *, download: bool = True, normalize: str = "dataset"
) -> tuple[TensorData, TensorData]:
    """Load the (train, test) sets of ``name`` as normalized tensors; cached per process.

    Parameters
    ----------
    name : str
        One of ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``.
    root : str
        See :func:`find_data_root`.
    download : bool
        Whether a torchvision download may be attempted when no offline source has the data.
    normalize : str
        ``dataset``: the training set's per-channel mean/std; ``half``: mean 0.5, std 0.5 (PFLlib).

    Returns
    -------
    tuple[TensorData, TensorData]
        Training and test set. They are shared by later calls with the same source: do not modify in place.
    """
    path = find_data_root(name, root, download=download)
    return _load(name, str(path.resolve()), normalize)


def clear_dataset_cache() -> None:
    """Forget the datasets :func:`load_dataset` keeps (their memory is freed once nothing else holds them)."""
    _load.cache_clear()


@functools.lru_cache(maxsize=4)  # Ray actors call load_dataset every round
def _load(name: str, root: str, normalize: str) -> tuple[TensorData, TensorData]:
    spec = _normalization(name, normalize)
    try:
        return _convert(spec, spec.cls(root, train=True)), _convert(spec, spec.cls(root, train=False))
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted" (e.g. a checksum mismatch)
        raise DataError(f"data.dataset: {name} under {root} could not be read ({err})") from None


def _convert(spec: _Spec, ds: tv.MNIST | tv.CIFAR10) -> TensorData:
    """All samples at once from ``.data``/``.targets`` (never PIL one by one), channels first."""
    images = torch.as_tensor(np.asarray(ds.data))
    x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR stores NHWC
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return TensorData(_normalized(x, spec), y, spec.num_classes, tuple(ds.classes))


def _normalized(x: torch.Tensor, spec: _Spec) -> torch.Tensor:
    x = x.contiguous().float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def normalized(x: torch.Tensor, name: str, normalize: str = "dataset") -> torch.Tensor:
    """uint8 images (N, C, H, W) of dataset ``name`` as the float tensors :func:`load_dataset` gives."""
    return _normalized(x, _normalization(name, normalize))


def pixels(x: torch.Tensor, name: str, normalize: str = "dataset") -> torch.Tensor:
    """The uint8 images that :func:`normalized` turns into ``x`` (exactly: checked)."""
    spec = _normalization(name, normalize)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    values = (x * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    if not torch.equal(_normalized(values, spec), x):
        raise DataError(f"data.dataset: these {name} tensors are not normalized 8-bit images")
    return values


def class_names(name: str) -> tuple[str, ...]:
    """The class names of dataset ``name``, in label order."""
    return _spec(name).classes


def image_shape(name: str) -> tuple[int, int]:
    """(channels, height = width) of the images of dataset ``name``."""
    spec = _spec(name)
    return len(spec.mean), spec.size
