"""Map-style datasets shared by the layouts: image files (optionally cropped), in-memory arrays, wrapped sets.

Every one yields (transform(RGB PIL image), int label), so the evaluation loop never knows where images came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlpretrain.errors import DataError
from vlpretrain.formats import IMAGE_SUFFIXES, to_rgb


def open_rgb(path: Path | str) -> Image.Image:
    """Decode an image file as 8-bit RGB (16-bit grey keeps its brightness), naming the file when it is unreadable."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


class ImageFiles(Dataset):
    """Images on disk with a label each, and an optional (left, top, right, bottom) crop box each."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable | None = None,
                 boxes: Sequence[tuple[int, int, int, int]] | None = None):
        assert len(paths) == len(labels) and (boxes is None or len(boxes) == len(paths))
        self.paths, self.labels, self.boxes, self.transform = list(paths), list(labels), boxes, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = open_rgb(self.paths[i])
        if self.boxes is not None:
            image = image.crop(self.boxes[i])
        return (self.transform(image) if self.transform else image), self.labels[i]


class ArrayImages(Dataset):
    """Decoded uint8 images held in memory: (N, H, W) grey or (N, H, W, 3) colour."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None):
        assert images.dtype == np.uint8 and images.ndim in (3, 4) and len(images) == len(labels)
        self.images, self.labels, self.transform = images, [int(x) for x in labels], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[i]


class Relabelled(Dataset):
    """A dataset yielding (PIL image, label) seen through RGB conversion, `transform` and a label remapping."""

    def __init__(self, base: Dataset, transform: Callable | None = None, label_map: Sequence[int] | None = None):
        self.base, self.transform, self.label_map = base, transform, label_map

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = to_rgb(image)
        label = int(label) if self.label_map is None else self.label_map[int(label)]
        return (self.transform(image) if self.transform else image), label


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted so that every run sees the same order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
