"""Augmented views of few-shot training images, encoded once and cached: what `zeroshot adapt --augment N` trains on.

CoOp, Tip-Adapter-F and CLAP train on random-resized-crop views of the k shots rather than on one feature per
image. A view here is a crop of the image holding `scale` (0.5..1 by default, Tip-Adapter's range) of its area at an
aspect ratio of 3/4..4/3, resized back to the image's own size, optionally flipped left-right (off by default: a
flipped digit or letter is another symbol), then passed through the model's eval transform. Crop boxes are drawn from
a generator seeded by (seed, the image's index in the train split, the view number), so a view is the same
whichever shots are drawn with it and in whatever order. Features of the views are cached beside the probe's (same
folder, a key naming the images, views and augmentation settings).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlpretrain.errors import ConfigError
from zeroshot.datasets import Benchmark
from zeroshot.features import cached_features, spread_subset, weights_digest

RATIO = (3 / 4, 4 / 3)  # aspect ratios of a crop box (torchvision's RandomResizedCrop default)


@dataclass(frozen=True)
class Augment:
    """How the views of a shot are made: `views` crops per image, each keeping `min_scale`..1 of the area."""

    views: int = 0
    min_scale: float = 0.5
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.views, int) or self.views < 0:
            raise ConfigError(f"augment: expected an integer >= 0 (views per shot), got {self.views!r}")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"augment min_scale: expected a number in (0, 1], got {self.min_scale!r}")

    def key(self) -> str:
        """A readable tag of the settings, part of the feature cache key."""
        return f"views{self.views}-scale{self.min_scale:g}-flip{int(self.flip)}"


def crop_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float] = (0.5, 1.0),
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random box holding `scale` of the area at an aspect ratio in
    `ratio` (log-uniform), as RandomResizedCrop draws one; the whole image when 10 draws do not fit."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    return 0, 0, width, height


def augmented_view(image: Image.Image, seed: int, index: int, view: int, augment: Augment) -> Image.Image:
    """View number `view` of the image at `index` of the train split: a seeded crop resized to the image's size."""
    rng = np.random.default_rng([seed, index, view])
    left, top, w, h = crop_box(rng, image.width, image.height, (augment.min_scale, 1.0))
    out = image.crop((left, top, left + w, top + h)).resize(image.size, Image.BICUBIC)
    if augment.flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


class ViewDataset(Dataset):
    """(transform(view), label) for `augment.views` views of each image at `indices` of `images` (view-major per
    image: the views of indices[0], then of indices[1], ...)."""

    def __init__(self, images: Dataset, indices: Sequence[int], augment: Augment, seed: int, transform) -> None:
        self.images, self.indices, self.augment = images, [int(i) for i in indices], augment
        self.seed, self.transform = seed, transform

    def __len__(self) -> int:
        return len(self.indices) * self.augment.views

    def __getitem__(self, i: int):
        shot, view = divmod(i, self.augment.views)
        image, label = self.images[self.indices[shot]]
        image = augmented_view(image.convert("RGB"), self.seed, self.indices[shot], view, self.augment)
        return self.transform(image), label


def view_features(model: torch.nn.Module, bench: Benchmark, root: str | os.PathLike, indices: torch.Tensor,
                  augment: Augment, cache_dir: str | os.PathLike, *, seed: int = 0, batch_size: int = 256,
                  workers: int = 0, device: str | torch.device | None = None, max_images: int | None = None,
                  format: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [len(indices) * views, D] and labels of the augmented views of the train images at `indices`
    (positions in the train split as `split_features` reads it, `max_images` included), cached."""
    from vlpretrain.models import image_transform

    if augment.views < 1:
        raise ConfigError("view_features needs at least one view per image")
    digest = weights_digest(model, scope="image")
    h = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
    key = (f"{bench.name}/train" + (f"-max{max_images}" if max_images else "")
           + f"/{augment.key()}-seed{seed}-{len(indices)}imgs-{h}")
    transform = image_transform(model, train=False)

    def load() -> Dataset:
        images = spread_subset(bench.load(root, split="train", transform=None, format=format).dataset, max_images)
        return ViewDataset(images, indices.tolist(), augment, seed, transform)

    return cached_features(model, key, load, cache_dir, digest=digest, batch_size=batch_size, device=device,
                           workers=workers)
