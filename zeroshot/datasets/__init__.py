"""The benchmark registry: `get_benchmark(name).load(root)` opens a benchmark from whatever layout is on disk."""

from collections.abc import Sequence

from zeroshot.datasets import captions, catalog, wds  # noqa: F401  (register their layouts and every benchmark)
from zeroshot.datasets.base import (
    BENCHMARKS,
    CLASSIFICATION_TASKS,
    TASKS,
    Benchmark,
    CaptionSet,
    EvalSet,
    Layout,
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


__all__ = ["BENCHMARKS", "CLASSIFICATION_TASKS", "TASKS", "Benchmark", "CaptionSet", "EvalSet", "Layout",
           "class_names", "get_benchmark", "list_benchmarks", "register"]
