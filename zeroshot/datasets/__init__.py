"""The benchmark registry: `get_benchmark(name).load(root)` opens a benchmark from whatever layout is on disk."""

from zeroshot.datasets import catalog  # noqa: F401  (registers every benchmark)
from zeroshot.datasets.base import BENCHMARKS, Benchmark, EvalSet, Layout, get_benchmark, register


def list_benchmarks() -> list[Benchmark]:
    """Every registered benchmark, in registration order."""
    return list(BENCHMARKS.values())


__all__ = ["BENCHMARKS", "Benchmark", "EvalSet", "Layout", "get_benchmark", "list_benchmarks", "register"]
