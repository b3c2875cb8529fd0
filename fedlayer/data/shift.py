"""Feature shift: every client's images come from its own *domain*, a deterministic transform of the pixels.

A domain is applied once, when the partition is built, to all of a client's samples (its local train and
test split alike), never per batch. Two families (``data.feature_shift``), each with ``data.domains``
domains and a ``data.severity`` s in [0, 1] (0 = every domain is the identity):

- ``rotate`` (Rotated-MNIST): domain k is rotated by k · s · 360° / domains counter-clockwise
  (4 domains at s = 1: 0°, 90°, 180°, 270°; multiples of 90° are exact, other angles bilinear, corners black).
- ``corrupt`` (in the spirit of MNIST-C / CIFAR-10-C): domain k is ``CORRUPTIONS[k]``: clean; Gaussian
  noise σ = 0.3 s; Gaussian blur σ = 1.5 s px; contrast × (1 − 0.8 s); inversion blended by s; elastic
  deformation (α = 34 s px, smoothing σ = 4 px, one seeded displacement field per image).

Images stay 8-bit: a transformed image is rounded to pixels again, so exports are lossless. The random
corruptions (noise, elastic) draw from a generator seeded by (seed, domain): the same config gives the same
images. Only torch and torchvision's functional transforms are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as nn_functional
from torchvision.transforms.v2 import functional as F

from fedlayer.data.sources import TensorData, normalized, pixels

CORRUPTIONS = ("clean", "noise", "blur", "contrast", "invert", "elastic")
NO_DOMAIN = -1  # samples no client holds (e.g. the shard partitioner's remainder) keep their pixels
ELASTIC_ALPHA, ELASTIC_SIGMA = 34.0, 4.0  # MNIST-C's elastic transform at full severity


@dataclass(frozen=True)
class FeatureShift:
    """A family of domains: ``kind`` (rotate | corrupt), how many, and how strong (``severity`` in [0, 1])."""

    kind: str
    domains: int
    severity: float
    seed: int

    def names(self) -> list[str]:
        """Each domain's name, e.g. ``rotate 90°`` or ``noise``."""
        if self.kind == "rotate":
            return [f"rotate {self.angle(k):g}°" for k in range(self.domains)]
        return list(CORRUPTIONS[: self.domains])

    def angle(self, domain: int) -> float:
        return domain * self.severity * 360.0 / self.domains

    def apply(self, images: torch.Tensor, domain: int) -> torch.Tensor:
        """Domain ``domain`` of float images in [0, 1] (N, C, H, W); an identity returns ``images``."""
        if self.kind == "rotate":
            return _rotate(images, self.angle(domain))
        corruption = CORRUPTIONS[domain]
        if corruption == "clean" or self.severity == 0:
            return images
        entropy = np.random.SeedSequence([self.seed, 0xFEA7, domain]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(entropy))
        return CORRUPT[corruption](images, self.severity, generator).clamp(0, 1)


def _rotate(images: torch.Tensor, angle: float) -> torch.Tensor:
    quarter = angle / 90.0
    if quarter.is_integer():  # exact, no interpolation
        return images if quarter % 4 == 0 else torch.rot90(images, int(quarter) % 4, dims=(-2, -1))
    return F.rotate(images, angle, interpolation=F.InterpolationMode.BILINEAR, fill=[0.0])


def _noise(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    return images + 0.3 * severity * torch.randn(images.shape, generator=generator)


def _blur(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    return smooth(images, 1.5 * severity)


def _contrast(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    return F.adjust_contrast(images, 1.0 - 0.8 * severity)


def _invert(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    return torch.lerp(images, F.invert(images), severity)


def _elastic(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ElasticTransform (uniform noise, blurred, scaled into a displacement field; bilinear,
    black outside), one field drawn per image; batched, equal to ``F.elastic`` image by image (tested)."""
    n, height, width = len(images), *images.shape[-2:]
    noise = torch.rand(n * 2, 1, height, width, generator=generator) * 2 - 1
    fields = smooth(noise, ELASTIC_SIGMA).view(n, 2, height, width)
    scale = torch.tensor([ELASTIC_ALPHA * severity / width, ELASTIC_ALPHA * severity / height])
    displacements = fields.permute(0, 2, 3, 1) * scale  # (N, H, W, 2): x then y, as torchvision's
    return _warp(images, displacements)


def smooth(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` with kernel size ⌊8σ + 1⌋ (made odd), as M_h · X · M_wᵀ: the 2-D
    kernel is the outer product of 1-D ones and reflect padding is per axis (a 33x33 conv is ~100x slower)."""
    height, width = images.shape[-2:]
    return _smoothing(height, sigma) @ images @ _smoothing(width, sigma).T


def _smoothing(n: int, sigma: float) -> torch.Tensor:
    """The (n, n) matrix of a 1-D Gaussian blur with reflect padding (row i: what output i averages)."""
    size = int(8 * sigma + 1) | 1
    half = size // 2
    offsets = torch.linspace(-half, half, size)
    kernel = torch.softmax(-0.5 * (offsets / sigma) ** 2, dim=0)  # exp(...) / its sum
    padded = nn_functional.pad(torch.eye(n).unsqueeze(1), [half, half], "reflect")  # (n, 1, n + 2 half)
    return nn_functional.conv1d(padded, kernel.view(1, 1, size)).squeeze(1).T


def _warp(images: torch.Tensor, displacements: torch.Tensor) -> torch.Tensor:
    """Sample ``images`` at the identity grid (pixel centres, [-1, 1]) plus ``displacements``."""
    height, width = images.shape[-2:]
    xs = (torch.arange(width, dtype=images.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=images.dtype) * 2 + 1) / height - 1
    identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
    grid = identity.unsqueeze(0) + displacements
    return nn_functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


CORRUPT: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "invert": _invert,
    "elastic": _elastic,
}


def assign_domains(clients: int, domains: int, assignment: str, seed: int) -> np.ndarray:
    """Client i's domain: ``round_robin`` i mod domains; ``random`` a seeded shuffle of that (every domain
    still held by ⌊clients / domains⌋ or one more clients)."""
    order = np.arange(clients) % domains
    if assignment == "round_robin":
        return order
    return np.random.default_rng([seed, 0xD0]).permutation(order)


def apply_domains(
    data: TensorData, domain_of: np.ndarray, shift: FeatureShift, dataset: str, normalize: str
) -> TensorData:
    """``data`` with sample j in domain ``domain_of[j]`` (``NO_DOMAIN``: unchanged); one transform call per
    domain over all its samples. ``dataset`` / ``normalize`` say how the tensors were normalized."""
    x = data.x.clone()
    for domain in range(shift.domains):
        index = torch.as_tensor(np.flatnonzero(domain_of == domain), dtype=torch.long)
        if len(index) == 0:
            continue
        images = pixels(x[index], dataset, normalize).float() / 255.0
        shifted = shift.apply(images, domain)
        if shifted is not images:
            x[index] = normalized((shifted * 255.0).round().to(torch.uint8), dataset, normalize)
    return TensorData(x, data.y, data.num_classes, data.classes)
