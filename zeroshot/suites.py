"""Named collections of benchmarks run from one root, and their score: DataComp's 38 tasks, VTAB, retrieval, ...

A suite is a data file, zeroshot/assets/suites/<name>.json (its tasks, the metric each is scored by, groups and
sources); `all` is every registered benchmark. A suite's score is the plain mean of its tasks' metrics, as
DataComp's `aggregate_scores.py` computes its "Average" over the 38 tasks, and each group's score the mean over
its members. A task without a result (not found under the root, or a NaN value, which DataComp's script drops)
is listed as missing and never silently left out: the score is then named for what it covers,
`datacomp_score_32_of_38`, and equals DataComp's score only under its full name.

    run = zeroshot.run_suite(model, "datacomp", "/data/datacomp_eval")   # folders wds_<task>_test under one root
    run.score.name, run.score.value, run.score.missing
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vlpretrain.errors import ConfigError, DataError
from vlpretrain.results import ResultEntry
from zeroshot.datasets import BENCHMARKS, get_benchmark
from zeroshot.datasets.base import ASSETS, datacomp_folder, folder_names, resolve_root
from zeroshot.evaluate import entry_task, evaluate_suite

SUITES_DIR = ASSETS / "suites"
ALL = "all"


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: our benchmark, the metric key that scores it and the name the suite shows."""

    benchmark: str
    metric: str
    label: str
    key: str = ""  # DataComp's task key, which names its folder wds_<key>_test


@dataclass(frozen=True)
class Suite:
    """A named collection: its tasks in order, the score's name and groups of task labels."""

    name: str
    score: str
    tasks: tuple[SuiteTask, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def suite_names() -> list[str]:
    """Every suite name: the data files under zeroshot/assets/suites, then `all`."""
    return [*sorted(p.stem for p in SUITES_DIR.glob("*.json")), ALL]


@functools.cache
def get_suite(name: str) -> Suite:
    """The suite called `name` (see suite_names); its benchmark and metric names are checked against the registry."""
    if name == ALL:
        tasks = tuple(SuiteTask(b.name, b.metric, b.name) for b in BENCHMARKS.values() if b.name != "captions")
        return Suite(ALL, "all_mean", tasks, sources={"tasks": "every registered benchmark but `captions`"})
    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"--suite: unknown suite {name!r} (suites: {', '.join(suite_names())})")
    doc = json.loads(path.read_text())
    tasks = []
    for t in doc["tasks"]:
        bench = get_benchmark(t["benchmark"])
        tasks.append(SuiteTask(bench.name, t.get("metric", bench.metric), t.get("name", bench.name), t.get("key", "")))
    labels = {t.label for t in tasks}
    groups = {g: tuple(members) for g, members in doc.get("groups", {}).items()}
    assert all(m in labels for members in groups.values() for m in members), f"{path}: a group names no task"
    return Suite(doc["name"], doc["score"], tuple(tasks), groups, dict(doc.get("sources", {})))


@dataclass
class SuiteScore:
    """A suite's score over the results at hand: `name` says how many tasks it covers when not all."""

    suite: str
    name: str
    value: float
    evaluated: int
    total: int
    missing: list[str]
    groups: dict[str, dict[str, float]]  # group -> {"value", "tasks", "of"}
    tasks: list[tuple[str, str, str, float | None]]  # (label, benchmark, metric, value or None)

    def as_dict(self) -> dict[str, Any]:
        """The block a results file stores under "suites"."""
        return {"score": self.name, "value": self.value, "evaluated": self.evaluated, "total": self.total,
                "missing": list(self.missing), "groups": self.groups}


def score_name(base: str, evaluated: int, total: int) -> str:
    """`base` when every task counts, else `base_<evaluated>_of_<total>`."""
    return base if evaluated == total else f"{base}_{evaluated}_of_{total}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_suite(suite: Suite | str, entries: Sequence[ResultEntry]) -> SuiteScore:
    """The suite's score from results entries: the plain mean of each task's metric (aggregate_scores' "Average"),
    group means over the members present, and the tasks without a value listed in `missing`."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    by_key = {(e.task, e.benchmark): e for e in entries}
    rows, values = [], {}
    for t in suite.tasks:
        entry = by_key.get((entry_task(get_benchmark(t.benchmark)), t.benchmark))
        value = entry.metrics.get(t.metric) if entry is not None else None
        if value is not None and math.isnan(value):
            value = None
        rows.append((t.label, t.benchmark, t.metric, value))
        if value is not None:
            values[t.label] = value
    missing = [b for label, b, _, v in rows if v is None]
    groups = {}
    for g, members in suite.groups.items():
        present = [values[m] for m in members if m in values]
        groups[g] = {"value": _mean(present), "tasks": float(len(present)), "of": float(len(members))}
    return SuiteScore(suite.name, score_name(suite.score, len(values), len(rows)), _mean(list(values.values())),
                      len(values), len(rows), missing, groups, rows)


@dataclass
class SuiteRun:
    """What `run_suite` did: the entries evaluated, the tasks not found under the root (with why) and the score."""

    entries: list[ResultEntry]
    not_found: dict[str, str]
    score: SuiteScore


def locate_suite(suite: Suite | str, root: str | os.PathLike, format: str | None = None) -> tuple[list[str],
                                                                                                   dict[str, str]]:
    """The suite's benchmarks found in their own folder under the collection `root` (by folder name, DataComp's
    wds_<task>_test included) and, for the others, the one-line reason each is missing. A benchmark is never
    looked for in `root` itself: its other tasks' folders would pass for class folders there."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    found, not_found = [], {}
    for t in suite.tasks:
        bench = get_benchmark(t.benchmark)
        folder = resolve_root(bench, Path(root))
        if folder == Path(root):
            first = datacomp_folder(t.key) if t.key else folder_names(bench)[1]
            not_found[t.benchmark] = f"no folder {first}/ or {bench.name}/ under {root}"
            continue
        try:
            bench.locate(folder, format=format)
            found.append(t.benchmark)
        except (DataError, ConfigError) as e:
            not_found[t.benchmark] = str(e).splitlines()[0]
    return found, not_found


def run_suite(model: nn.Module, suite: str, root: str | os.PathLike, *,
              on_result: Callable[[ResultEntry], None] | None = None, **kwargs: Any) -> SuiteRun:
    """Evaluate every task of `suite` found under `root` (one folder each: ours, CLIP_benchmark's or DataComp's
    wds_<task>_test names) and score it; tasks not found are listed, not evaluated. `kwargs` go to
    `zeroshot.evaluate_suite` (tokenizer, batch_size, device, max_images, ...)."""
    spec = get_suite(suite)
    if not Path(root).is_dir():
        raise ConfigError(f"root: {root} is not a folder")
    found, not_found = locate_suite(spec, root, kwargs.get("format"))
    entries = evaluate_suite(model, found, root, on_result=on_result, **kwargs) if found else []
    return SuiteRun(entries, not_found, score_suite(spec, entries))


def format_score(score: SuiteScore) -> str:
    """The score, its groups and what is missing, as lines to print."""
    lines = [f"{score.name}: {score.value:.4f} (mean of {score.evaluated} of {score.total} {score.suite} tasks)"]
    for g, s in score.groups.items():
        cover = "" if s["tasks"] == s["of"] else f" ({int(s['tasks'])} of {int(s['of'])})"
        lines.append(f"  {g}: {s['value']:.4f}{cover}")
    if score.missing:
        lines.append(f"  missing {len(score.missing)}: {', '.join(score.missing)}")
    return "\n".join(lines)
