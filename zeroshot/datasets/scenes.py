"""Layouts whose labels are computed from annotations: CLEVR counts and distances, KITTI vehicle distance, VOC crops.

The rules are VTAB's (as CLIP_benchmark evaluates them) and CLIP_benchmark's VOC2007 crops:
- clevr-count: number of objects minus 3 (CLEVR scenes hold 3..10 objects).
- clevr-distance: the depth of the nearest object, binned by thresholds 0, 8, 8.5, 9, 9.5, 10, 100.
- kitti-distance: the depth of the nearest Car/Van/Truck binned by -100, 8, 20, 999 (no vehicle: the last bin).
- voc2007: every annotated object of the test images, cropped to its box, labelled with its class.
- voc2007-multilabel: each test image whole, with every class that has an annotated object in it (CLIP_benchmark's
  PASCALVoc2007; objects marked difficult count too).
The folders are torchvision's (`clevr/CLEVR_v1.0`, `Kitti/raw/training`, `VOCdevkit/VOC2007`), or those inner
folders given as the root.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vlpretrain.errors import DataError
from zeroshot.datasets.base import Benchmark, EvalSet, Layout
from zeroshot.datasets.common import ImageFiles


def bin_index(value: float, thresholds: Sequence[float]) -> int:
    """VTAB's binning: the last i with thresholds[i] < value."""
    return max(i for i, t in enumerate(thresholds) if t < value)


def clevr_count_label(objects: list[dict]) -> int:
    return len(objects) - 3


CLEVR_DISTANCE_BINS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_BINS = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLES = ("Car", "Van", "Truck")


def clevr_distance_label(objects: list[dict]) -> int:
    return bin_index(min(o["pixel_coords"][2] for o in objects), CLEVR_DISTANCE_BINS)


def kitti_distance_label(label_lines: list[str]) -> int:
    """From a KITTI label_2 file: fields are type, truncated, occluded, alpha, bbox(4), dims(3), location(3), ry."""
    depths = [float(f[13]) for f in (line.split() for line in label_lines) if f and f[0] in KITTI_VEHICLES]
    return bin_index(min(depths + [1000.0]), KITTI_DISTANCE_BINS)


class _NestedLayout(Layout):
    """A layout found at one of several depths under the root: the first CANDIDATES folder holding MARKER."""

    name = "torchvision"
    CANDIDATES: tuple[str, ...] = ("",)
    MARKER = ""

    def _base(self, root: Path) -> Path | None:
        return next((root / c for c in self.CANDIDATES if (root / c / self.MARKER).is_dir()), None)

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._base(root) is not None

    def _found(self, root: Path) -> Path:
        base = self._base(root)
        assert base is not None, "open() is only called after detect()"
        return base


class ClevrLayout(_NestedLayout):
    """`clevr/CLEVR_v1.0/images/val/*.png` with `scenes/CLEVR_val_scenes.json` (VTAB's test split is CLEVR's val)."""

    SPLIT = {"test": "val", "train": "train"}
    CANDIDATES = ("clevr/CLEVR_v1.0", "CLEVR_v1.0", "")
    MARKER = "scenes"

    def __init__(self, label: Callable[[list[dict]], int]):
        self.label = label

    def expected(self, bench: Benchmark, split: str) -> str:
        s = self.SPLIT[split]
        return f"clevr/CLEVR_v1.0/images/{s}/*.png and clevr/CLEVR_v1.0/scenes/CLEVR_{s}_scenes.json"

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        base = self._found(root)
        s = self.SPLIT[split]
        scenes_file, images = base / "scenes" / f"CLEVR_{s}_scenes.json", base / "images" / s
        if not scenes_file.is_file() or not images.is_dir():
            raise DataError(f"{base}: incomplete CLEVR; expected {scenes_file} and {images}/")
        try:
            scenes = json.loads(scenes_file.read_text())["scenes"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{scenes_file}: not a CLEVR scenes file ({e})") from None
        paths, labels = [], []
        for scene in scenes:
            path = images / scene["image_filename"]
            if not path.is_file():
                raise DataError(f"{scenes_file}: scene image {path} does not exist")
            label = self.label(scene["objects"])
            if not 0 <= label < len(bench.classnames):
                raise DataError(f"{scenes_file}: {scene['image_filename']} gives label {label}, outside "
                                f"{bench.name}'s {len(bench.classnames)} classes")
            paths.append(path)
            labels.append(label)
        return self.evalset(bench, root, ImageFiles(paths, labels, transform))


class KittiLayout(_NestedLayout):
    """torchvision's `Kitti/raw/training/{image_2,label_2}`: every labelled image (KITTI's test set has no labels)."""

    CANDIDATES = ("Kitti/raw/training", "raw/training", "training", "")
    MARKER = "label_2"

    def expected(self, bench: Benchmark, split: str) -> str:
        return "Kitti/raw/training/image_2/*.png with Kitti/raw/training/label_2/*.txt"

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        base = self._found(root)
        paths, labels = [], []
        for label_file in sorted((base / "label_2").glob("*.txt")):
            image = base / "image_2" / f"{label_file.stem}.png"
            if not image.is_file():
                raise DataError(f"{label_file}: its image {image} does not exist")
            try:
                labels.append(kitti_distance_label(label_file.read_text().splitlines()))
            except (IndexError, ValueError):
                raise DataError(f"{label_file}: not a KITTI object label file") from None
            paths.append(image)
        if not paths:
            raise DataError(f"{base / 'label_2'}: no label files")
        return self.evalset(bench, root, ImageFiles(paths, labels, transform))


class VocCropsLayout(_NestedLayout):
    """`VOCdevkit/VOC2007/{ImageSets/Main/<split>.txt, Annotations, JPEGImages}`: one crop per annotated object."""

    CANDIDATES = ("VOCdevkit/VOC2007", "VOC2007", "")
    MARKER = "Annotations"
    SPLIT = {"test": "test", "train": "trainval"}

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"VOCdevkit/VOC2007/ImageSets/Main/{self.SPLIT[split]}.txt, Annotations/ and JPEGImages/"

    def _objects(self, root: Path, split: str, bench: Benchmark) -> tuple[Path, list[tuple[str, list]]]:
        """The VOC folder and, per image id of the split, its (class index, box) objects."""
        base = self._found(root)
        ids_file = base / "ImageSets" / "Main" / f"{self.SPLIT[split]}.txt"
        if not ids_file.is_file():
            raise DataError(f"{base}: incomplete VOC2007; missing {ids_file}")
        index = {name: i for i, name in enumerate(bench.classnames)}
        images = []
        for image_id in ids_file.read_text().split():
            xml = base / "Annotations" / f"{image_id}.xml"
            try:
                found = ET.parse(xml).getroot().findall("object")
            except (OSError, ET.ParseError) as e:
                raise DataError(f"{xml}: cannot read annotation ({e})") from None
            objects = []
            for obj in found:
                name = obj.findtext("name", "").strip()
                if name not in index:
                    raise DataError(f"{xml}: unknown VOC class {name!r}")
                box = obj.find("bndbox")
                if box is None:
                    raise DataError(f"{xml}: object {name!r} has no bndbox")
                objects.append((index[name], tuple(int(float(box.findtext(k, "0")))
                                                   for k in ("xmin", "ymin", "xmax", "ymax"))))
            images.append((image_id, objects))
        if not any(objects for _, objects in images):
            raise DataError(f"{ids_file}: no annotated objects")
        return base, images

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        base, images = self._objects(root, split, bench)
        paths, labels, boxes = [], [], []
        for image_id, objects in images:
            for label, box in objects:
                boxes.append(box)
                paths.append(base / "JPEGImages" / f"{image_id}.jpg")
                labels.append(label)
        return self.evalset(bench, root, ImageFiles(paths, labels, transform, boxes))  # type: ignore[arg-type]


class VocMultilabelLayout(VocCropsLayout):
    """The same VOC2007 folders, each image whole with a 0/1 target per class present (multi-label)."""

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        base, images = self._objects(root, split, bench)
        targets = torch.zeros(len(images), len(bench.classnames), dtype=torch.long)
        for i, (_, objects) in enumerate(images):
            for label, _ in objects:
                targets[i, label] = 1
        paths = [base / "JPEGImages" / f"{image_id}.jpg" for image_id, _ in images]
        return self.evalset(bench, root, ImageFiles(paths, list(range(len(paths))), transform), targets)
