"""The benchmark registry: `get_benchmark(name).load(root)` opens a benchmark from whatever layout is on disk."""

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from zeroshot.datasets import captions, catalog, datacomp, wds  # noqa: F401  (register layouts and every benchmark)
from zeroshot.datasets.base import (
    BENCHMARKS,
    CLASSIFICATION_TASKS,
    TASKS,
    Benchmark,
    CaptionSet,
    EvalSet,
    Grouping,
    Layout,
    SelectionSet,
    get_benchmark,
    register,
)


def list_benchmarks(tasks: Sequence[str] | None = CLASSIFICATION_TASKS) -> list[Benchmark]:
    """The registered benchmarks of `tasks` in registration order: by default the zero-shot classification ones
    (class names and prompts), `tasks=None` for every one, retrieval included."""
    return [b for b in BENCHMARKS.values() if tasks is None or b.task in tasks]


def class_names(benchmark: str, language: str | None = None) -> list[str]:
    """The class names of a registered benchmark, in `language` (default English); `vlpretrain make-shards
    --classes NAME` reads them through the `vlpretrain.class_names` entry point."""
    return list(get_benchmark(benchmark, language).classnames)


from zeroshot.datasets.datacomp import AssociationSet  # noqa: E402


class TestImages(Sequence):
    """A benchmark's test images as PIL images, read one at a time (labels and captions left out)."""

    def __init__(self, data: EvalSet | CaptionSet):
        self.dataset = data.images if isinstance(data, CaptionSet) else data.dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[i][0]


def test_images(benchmark: str, root: str | Path) -> Sequence[Image.Image]:
    """The test images of a registered benchmark under `root` (`vlpretrain curate --decontaminate` reads them
    through the `vlpretrain.benchmark_images` entry point)."""
    return TestImages(get_benchmark(benchmark).load(root, split="test"))


__all__ = ["BENCHMARKS", "CLASSIFICATION_TASKS", "TASKS", "AssociationSet", "Benchmark", "CaptionSet", "EvalSet",
           "Grouping", "Layout", "SelectionSet", "class_names", "get_benchmark", "list_benchmarks", "register",
           "test_images"]
