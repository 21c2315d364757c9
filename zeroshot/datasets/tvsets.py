"""torchvision's own readers (download=False) for the benchmarks whose files torchvision knows.

`root` may be the folder torchvision is given (holding `food-101/`, `dtd/`, ...) or that inner folder itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from vlpretrain.errors import DataError, VLPretrainError
from zeroshot.datasets.base import Benchmark, EvalSet, Layout
from zeroshot.datasets.common import Relabelled

Factory = Callable[[str, str], Dataset]  # (torchvision root, split) -> dataset of (PIL image, label)


class TorchvisionLayout(Layout):
    """A torchvision dataset class read from its documented folder layout, found by marker files."""

    name = "torchvision"

    def __init__(self, factory: Factory, markers: dict[str, Sequence[str]], label_map: Sequence[int] | None = None,
                 needs: str | None = None):
        self.factory, self.markers, self.label_map, self.needs = factory, markers, label_map, needs

    def _tv_root(self, root: Path, split: str) -> Path | None:
        for base in (root, root.parent):
            if any((base / m).exists() for m in self.markers[split]):
                return base
        return None

    def expected(self, bench: Benchmark, split: str) -> str:
        return " or ".join(self.markers[split]) + " (torchvision layout)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._tv_root(root, split) is not None

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        if self.needs and importlib.util.find_spec(self.needs) is None:
            raise VLPretrainError(f"reading {bench.name} in torchvision's layout needs {self.needs} "
                                  f"(pip install {self.needs}), or use its CLIP_benchmark webdataset export")
        tv_root = self._tv_root(root, split)
        assert tv_root is not None
        try:
            base = self.factory(str(tv_root), split)
        except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
            raise DataError(f"{tv_root}: torchvision cannot read {bench.name} ({str(e).splitlines()[0]}); expected "
                            f"{self.expected(bench, split)}") from None
        classes = getattr(base, "classes", None)
        if classes is not None and len(classes) != len(bench.classnames):
            raise DataError(f"{tv_root}: torchvision found {len(classes)} {bench.name} classes, the benchmark has "
                            f"{len(bench.classnames)}")
        if len(base) == 0:  # type: ignore[arg-type]
            raise DataError(f"{tv_root}: torchvision found no {bench.name} {split} images")
        if base[0][1] is None:  # e.g. FER2013's Kaggle test.csv, which has no labels
            raise DataError(f"{tv_root}: the {bench.name} {split} files carry no labels; expected "
                            f"{self.expected(bench, split)}")
        return self.evalset(bench, root, Relabelled(base, transform, self.label_map))


def tv(cls_name: str, split_names: dict[str, str] | None = None, has_split: bool = True,
       has_download: bool = True, **kwargs) -> Factory:
    """A factory for torchvision.datasets.<cls_name>(root, split=..., download=False, **kwargs).

    `split_names` maps our split names (test, train) to the class's own (e.g. pets' "trainval");
    datasets without splits (SUN397) are read whole for either split, as CLIP_benchmark does.
    """

    def make(root: str, split: str) -> Dataset:
        import torchvision.datasets as tvd

        args = dict(kwargs)
        if has_split:
            args["split"] = (split_names or {}).get(split, split)
        if has_download:
            args["download"] = False
        return getattr(tvd, cls_name)(root, **args)

    return make
