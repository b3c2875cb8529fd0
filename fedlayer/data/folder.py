"""A data holder's own images in torchvision's ImageFolder layout, and partitions exported into it.

``ROOT/train/<class>/<name>.png`` and ``ROOT/test/<class>/<name>.png``: ``<class>`` is one of the
experiment's class folders (:func:`class_folders`: the dataset's class names, ``/`` written as ``_``); a data
holder may lack some classes, but has no other folder. Images must have the dataset's size; they are
converted to its channels (grayscale or RGB) and normalized exactly as the benchmark's images. Samples are
ordered by file name across classes (numeric names numerically), so an exported partition loads in its
original order and a SuperNode on it trains exactly as one on the partition.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from fedlayer.data.sources import DataError, TensorData, class_names, image_shape, normalized, pixels

SPLITS = ("train", "test")


def class_folders(dataset: str) -> list[str]:
    """The folder name of each class of ``dataset``, in label order."""
    return [name.replace("/", "_") for name in class_names(dataset)]


SHOWN_PROBLEMS = 5  # a folder's problems listed in its error; the rest are counted


def check_folder(root: Path, dataset: str, field: str = "data-dir") -> None:
    """DataError (one line naming ``field``) unless ``root`` is an ImageFolder tree of ``dataset``; every
    problem of the tree is in it, not just the first."""
    if problems := _layout_problems(root, dataset):
        raise DataError(_problems_line(field, problems))


def _layout_problems(root: Path, dataset: str) -> list[str]:
    allowed = class_folders(dataset)
    problems = []
    for split in SPLITS:
        directory = root / split
        if not directory.is_dir():
            problems.append(f"{directory} does not exist; expected {root}/{{train,test}}/<class>/")
            continue
        unknown = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name not in allowed)
        if unknown:
            problems.append(
                f"class folder(s) {', '.join(map(repr, unknown))} in {directory} are not classes "
                f"of {dataset}; allowed: {', '.join(map(repr, allowed))}"
            )
    return problems


def _problems_line(field: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{field}: {problems[0]}"
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{field}: {len(problems)} problems: {shown}{more}"


def load_folder(root: str | Path, dataset: str, normalize: str = "dataset") -> tuple[TensorData, TensorData]:
    """The (train, test) data under ``root``, normalized as ``dataset``'s (see ``data.normalize``)."""
    return _load_folder(str(Path(root).expanduser().resolve()), dataset, normalize)


@lru_cache(maxsize=2)  # a simulation's client actors ask every round
def _load_folder(root: str, dataset: str, normalize: str) -> tuple[TensorData, TensorData]:
    problems = _layout_problems(Path(root), dataset)
    loaded = [_load_split(Path(root) / split, dataset, normalize) for split in SPLITS]
    problems += [problem for _, split_problems in loaded for problem in split_problems]
    if problems:
        raise DataError(_problems_line("data-dir", problems))
    train, test = (data for data, _ in loaded)
    return train, test


def _load_split(directory: Path, dataset: str, normalize: str) -> tuple[TensorData, list[str]]:
    """The split's images, and the problem of every image that cannot be used."""
    label_of = {name: label for label, name in enumerate(class_folders(dataset))}
    found = make_dataset(directory, label_of, IMG_EXTENSIONS, allow_empty=True) if directory.is_dir() else []
    samples = sorted(found, key=_file_order)
    channels, size = image_shape(dataset)
    images = np.zeros((len(samples), size, size, channels), dtype=np.uint8)
    problems = []
    for i, (path, _) in enumerate(samples):
        try:
            images[i] = _read(Path(path), channels, size)
        except DataError as err:
            problems.append(str(err))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorData(normalized(x, dataset, normalize), y, len(label_of), class_names(dataset)), problems


def _file_order(sample: tuple[str, int]) -> tuple[bool, int, str, int]:
    stem = Path(sample[0]).stem
    return (not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem, sample[1])


def _read(path: Path, channels: int, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.size != (size, size):
                raise DataError(f"{path} is {image.size[0]}x{image.size[1]}; expected {size}x{size}")
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except OSError as err:  # not an image (PIL's UnidentifiedImageError), cut off, unreadable
        raise DataError(f"cannot read {path} ({_reason(err)})") from None
    return array.reshape(size, size, channels)


def _reason(err: OSError) -> str:
    return err.strerror or str(err).split(" '")[0] or type(err).__name__


def export_partition(train: TensorData, test: TensorData, dataset: str, normalize: str, out: Path) -> None:
    """Write one client's data as ``out/{train,test}/<class>/<index>.png`` (lossless: PNG of the pixels)."""
    folders = class_folders(dataset)
    for split, data in zip(SPLITS, (train, test), strict=True):
        for name in folders:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        values = pixels(data.x, dataset, normalize)
        for index, (image, label) in enumerate(zip(values, data.y.tolist(), strict=True)):
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
                out / split / folders[label] / f"{index}.png"
            )
