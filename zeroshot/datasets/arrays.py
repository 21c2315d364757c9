"""Array-file layouts read by our own parsers: CIFAR's pickle batches and MNIST-style idx files.

torchvision's readers check each file's MD5 and want idx files unpacked under `<root>/<Name>/raw/`; ours read the
same files without either condition, so Debian's gzipped Fashion-MNIST in /usr/share/datasets works as it is and
tests can write small files in the exact format. The pickles are read with an unpickler that only builds numpy
arrays, so a hostile batch file cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vlpretrain.errors import DataError
from vlpretrain.formats import read_idx
from zeroshot.datasets.base import Benchmark, EvalSet, Layout, first_existing
from zeroshot.datasets.common import ArrayImages


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (all a CIFAR batch holds)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images (N, 32, 32, 3) uint8 and labels of one CIFAR-10/100 python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e})") from None
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    labels = batch.get("labels", batch.get("fine_labels"))
    data = np.asarray(batch.get("data"))
    if labels is None or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N 'labels' or 'fine_labels'")
    # rows are 1024 red, then green, then blue values of a 32x32 image
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(x) for x in labels]


class CifarLayout(Layout):
    """torchvision's CIFAR layout: `<root>/cifar-10-batches-py/test_batch` or `<root>/cifar-100-python/test`."""

    name = "torchvision"

    def __init__(self, folder: str, test: tuple[str, ...], train: tuple[str, ...]):
        self.folder, self.files = folder, {"test": test, "train": train}

    def _dir(self, root: Path) -> Path | None:
        return first_existing(root, (self.folder, ""))

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{self.folder}/{{{','.join(self.files[split])}}} (CIFAR python pickles)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        d = self._dir(root)
        return d is not None and any((d / f).is_file() for f in self.files[split])

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        d = self._dir(root)
        assert d is not None
        missing = [str(d / f) for f in self.files[split] if not (d / f).is_file()]
        if missing:
            raise DataError(f"{d}: incomplete {bench.name} {split} split; missing {', '.join(missing)}")
        parts = [read_cifar_batch(d / f) for f in self.files[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = [y for p in parts for y in p[1]]
        check_labels(labels, len(bench.classnames), d / self.files[split][0])
        return self.evalset(bench, root, ArrayImages(images, labels, transform))


class IdxLayout(Layout):
    """MNIST-style idx files, gzipped or not, in `<root>`, `<root>/raw` or torchvision's `<root>/<Name>/raw`."""

    name = "torchvision"
    PREFIX = {"test": "t10k", "train": "train"}

    def __init__(self, torchvision_name: str):
        self.tv_name = torchvision_name

    def _files(self, split: str) -> tuple[str, str]:
        p = self.PREFIX[split]
        return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"

    def _find(self, root: Path, name: str) -> Path | None:
        for d in (root, root / "raw", root / self.tv_name / "raw"):
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def expected(self, bench: Benchmark, split: str) -> str:
        images, labels = self._files(split)
        return f"{images}[.gz] and {labels}[.gz] in the root, raw/ or {self.tv_name}/raw/ (idx files)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return any(self._find(root, name) for name in self._files(split))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        names = self._files(split)
        paths = [self._find(root, n) for n in names]
        if None in paths:
            missing = [n for n, p in zip(names, paths) if p is None]
            raise DataError(f"{root}: incomplete {bench.name} {split} split; missing {' and '.join(missing)}[.gz]")
        images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[0]}: expected N uint8 images matching the N labels of {paths[1]}, "
                            f"got shapes {images.shape} and {labels.shape}")
        check_labels(labels.tolist(), len(bench.classnames), paths[1])  # type: ignore[arg-type]
        return self.evalset(bench, root, ArrayImages(np.ascontiguousarray(images), labels.tolist(), transform))


def check_labels(labels: list[int], num_classes: int, source: Path) -> None:
    """Every label must name one of the benchmark's classes."""
    bad = next((y for y in labels if not 0 <= y < num_classes), None)
    if bad is not None:
        raise DataError(f"{source}: label {bad} is outside the benchmark's {num_classes} classes")
