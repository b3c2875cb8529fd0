"""A data holder's own images (ImageFolder layout): partitions exported losslessly and loaded back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedlayer.cli import main
from fedlayer.config import load_config
from fedlayer.data import DataError
from fedlayer.data.folder import check_folder, class_folders, load_folder
from fedlayer.data.sources import normalized, pixels
from fedlayer.experiment import federated_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.toml")


def overrides(data_root: Path, clients: int = 3) -> list[str]:
    return [f"data.root='{data_root}'", "data.min_partition_size=5", f"federation.clients={clients}"]


@pytest.mark.parametrize("normalize", ["dataset", "half"])
@pytest.mark.parametrize(("dataset", "channels", "size"), [("fashion_mnist", 1, 28), ("cifar10", 3, 32)])
def test_pixels_invert_the_normalization(dataset: str, channels: int, size: int, normalize: str) -> None:
    images = torch.randint(0, 256, (20, channels, size, size), dtype=torch.uint8)
    assert torch.equal(pixels(normalized(images, dataset, normalize), dataset, normalize), images)
    with pytest.raises(DataError, match="not normalized 8-bit images"):
        pixels(torch.full((1, channels, size, size), 0.123), dataset, normalize)


def test_exported_partitions_load_back_identical(
    tiny_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedlayer partitions --export`: each partition's train and test data, bit for bit and in order."""
    sets = [a for item in overrides(tiny_fmnist) for a in ("--set", item)]
    export = tmp_path / "export"
    assert main(["partitions", DEFAULT, *sets, "--out", str(tmp_path / "p"), "--export", str(export)]) == 0
    assert "exported 3 partitions" in capsys.readouterr().out
    data = federated_data(load_config(DEFAULT, overrides(tiny_fmnist)))
    for split in data.splits:
        folder = export / f"partition-{split.partition_id}"
        assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(class_folders("fashion_mnist"))
        loaded = load_folder(folder, "fashion_mnist")
        for mine, theirs in zip(loaded, data.client(split.partition_id), strict=True):
            assert torch.equal(mine.x, theirs.x) and torch.equal(mine.y, theirs.y)
            assert mine.num_classes == theirs.num_classes
    first = export / "partition-0" / "train"
    assert {p.suffix for p in first.rglob("*") if p.is_file()} == {".png"}
    # The export refuses a directory that holds anything, and leaves it alone.
    assert main(["partitions", DEFAULT, *sets, "--out", str(tmp_path / "p"), "--export", str(export)]) == 2
    assert capsys.readouterr().err.startswith("fedlayer: error: --export:")


def write_image(path: Path, size: int = 28, value: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_own_data_is_ordered_by_file_name_across_classes(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "Trouser" / "2.png", value=2)
    write_image(tmp_path / "train" / "T-shirt_top" / "10.png", value=10)
    write_image(tmp_path / "train" / "Bag" / "1.png", value=1)
    (tmp_path / "test" / "Coat").mkdir(parents=True)  # empty classes and an empty split are allowed
    train, test = load_folder(tmp_path, "fashion_mnist")
    assert train.y.tolist() == [8, 1, 0] and len(test) == 0 and test.x.shape == (0, 1, 28, 28)
    assert pixels(train.x, "fashion_mnist")[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_class_folders_must_be_the_experiments_classes(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "cat" / "0.png")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError) as err:
        check_folder(tmp_path, "fashion_mnist")
    message = str(err.value)
    assert "\n" not in message and message.startswith("data-dir: class folder(s) 'cat' in")
    assert "not classes of fashion_mnist; allowed: 'T-shirt_top', 'Trouser'" in message


def test_missing_split_and_wrong_image_size_are_one_line_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "Bag" / "0.png", size=32)
    with pytest.raises(
        DataError, match=r"^data-dir: 2 problems: .*/test does not exist; expected .*/<class>/; "
    ):
        load_folder(tmp_path, "fashion_mnist")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"^data-dir: .*0\.png is 32x32; expected 28x28$"):
        load_folder(tmp_path, "fashion_mnist")


def test_every_problem_of_a_folder_is_reported_at_once(tmp_path: Path) -> None:
    """A file that is not an image, images of the wrong size in both splits and a foreign class folder."""
    write_image(tmp_path / "train" / "Bag" / "0.png")
    (tmp_path / "train" / "Bag" / "x.png").write_text("not an image")
    write_image(tmp_path / "train" / "Dress" / "9999.png", size=40)
    write_image(tmp_path / "test" / "Coat" / "1.png", size=32)
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(DataError) as err:
        load_folder(tmp_path, "fashion_mnist")
    message = str(err.value)
    assert "\n" not in message and message.startswith("data-dir: 4 problems: class folder(s) 'cat' in ")
    assert f"cannot read {tmp_path / 'train' / 'Bag' / 'x.png'} (cannot identify image file)" in message
    assert f"{tmp_path / 'train' / 'Dress' / '9999.png'} is 40x40; expected 28x28" in message
    assert f"{tmp_path / 'test' / 'Coat' / '1.png'} is 32x32; expected 28x28" in message
