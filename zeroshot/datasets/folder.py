"""Class-folder layouts (`<split dir>/<class folder>/<images>`), as ImageNet and its variants ship.

A class folder maps to a label either by the benchmark's folder list (ImageNet wnids, ObjectNet's folder names,
EuroSAT's and FER2013's names), by its integer name (ImageNetV2's 0..999), or by sorted order where the dataset's
folder names sort into its class order (torchvision's ImageFolder rule).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlpretrain.errors import DataError
from zeroshot.datasets.base import Benchmark, EvalSet, Layout
from zeroshot.datasets.common import ImageFiles, list_images


class FolderLayout(Layout):
    """Images in one folder per class, under the first split directory that exists."""

    name = "imagefolder"

    def __init__(self, test: tuple[str, ...] = ("test", ""), train: tuple[str, ...] = ("train",),
                 naming: str = "sorted", numeric: bool = False):
        assert naming in ("sorted", "asset")
        self.dirs, self.naming, self.numeric = {"test": test, "train": train}, naming, numeric

    def _class_dirs(self, root: Path, split: str) -> tuple[Path, list[Path]] | None:
        for rel in self.dirs[split]:
            d = root / rel if rel else root
            subdirs = sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
            if subdirs:
                return d, subdirs
        return None

    def _label_of(self, bench: Benchmark) -> Callable[[str], int | None]:
        folders = {name: i for i, name in enumerate(bench.folders or [])}
        n = len(bench.classnames)

        def label(folder: str) -> int | None:
            if folder in folders:
                return folders[folder]
            if self.numeric and folder.isdigit() and int(folder) < n:
                return int(folder)
            return None

        return label

    def expected(self, bench: Benchmark, split: str) -> str:
        where = " or ".join(f"{rel}/" if rel else "the root" for rel in self.dirs[split])
        kind = "wnid/name folders of the benchmark" if self.naming == "asset" else f"{len(bench.classnames)} class folders"
        if self.numeric and not bench.folders:
            kind = f"class folders 0..{len(bench.classnames) - 1} (named by label)"
        return f"{kind} under {where}, images inside"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        found = self._class_dirs(root, split)
        if found is None:
            return False
        if self.naming == "sorted":
            return True
        label = self._label_of(bench)
        return any(label(d.name) is not None for d in found[1])

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        found = self._class_dirs(root, split)
        assert found is not None
        base, class_dirs = found
        if self.naming == "sorted":
            if len(class_dirs) != len(bench.classnames):
                raise DataError(f"{base}: found {len(class_dirs)} class folders, {bench.name} has "
                                f"{len(bench.classnames)} classes (one folder each, in sorted order)")
            labels_of = {d.name: i for i, d in enumerate(class_dirs)}
        else:
            label = self._label_of(bench)
            unknown = [d.name for d in class_dirs if label(d.name) is None]
            if unknown:
                raise DataError(f"{base}: folder {unknown[0]!r} is not a {bench.name} class folder "
                                f"({len(unknown)} unknown folders)")
            labels_of = {d.name: label(d.name) for d in class_dirs}  # type: ignore[misc]
        paths, labels = [], []
        for d in class_dirs:
            images = list_images(d)
            paths += images
            labels += [labels_of[d.name]] * len(images)
        if not paths:
            raise DataError(f"{base}: the class folders hold no images")
        return self.evalset(bench, root, ImageFiles(paths, labels, transform))
