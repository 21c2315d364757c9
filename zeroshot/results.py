"""The results file: one JSON per model, one entry per (task, benchmark), shared by every evaluation task.

    {
      "schema": "zeroshot-results/1",
      "model": "runs/demo/model.safetensors",       # checkpoint path or architecture name
      "pretrained": null,                           # weights given separately, if any
      "date": "2026-11-26T12:00:00+00:00",          # last write
      "results": [
        {"task": "zeroshot", "benchmark": "fashion-mnist", "metric": "top1",
         "root": "/usr/share/datasets/fashion-mnist", "format": "torchvision", "date": "2026-11-26T12:00:00+00:00",
         "metrics": {"top1": 0.71, "top5": 0.98, "mean_per_class_recall": 0.71, "headline": 0.71, "images": 10000.0}}
      ]
    }

`task` names the evaluation ("zeroshot", "linear_probe", ...); `metric` names the key of `metrics` that is the
benchmark's headline number. Writing an entry replaces the one with the same task and benchmark.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlpretrain.errors import DataError

SCHEMA = "zeroshot-results/1"


def now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


@dataclass
class ResultEntry:
    """One task's metrics on one benchmark."""

    task: str
    benchmark: str
    metric: str
    metrics: dict[str, float]
    root: str | None = None
    format: str | None = None
    date: str = field(default_factory=now)

    @property
    def headline(self) -> float:
        return float(self.metrics[self.metric])


@dataclass
class Results:
    """Every result of one model."""

    model: str
    pretrained: str | None = None
    results: list[ResultEntry] = field(default_factory=list)
    date: str = field(default_factory=now)

    def add(self, entry: ResultEntry) -> None:
        """Add `entry`, replacing an earlier one for the same task and benchmark."""
        self.results = [r for r in self.results if (r.task, r.benchmark) != (entry.task, entry.benchmark)]
        self.results.append(entry)

    def get(self, task: str, benchmark: str) -> ResultEntry | None:
        return next((r for r in self.results if (r.task, r.benchmark) == (task, benchmark)), None)


def write_results(path: str | os.PathLike, results: Results) -> Path:
    """Write `results` atomically (temporary file, then rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results.date = now()
    doc = {"schema": SCHEMA, "model": results.model, "pretrained": results.pretrained, "date": results.date,
           "results": [asdict(r) for r in results.results]}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d or not isinstance(d[key], kind):
        raise DataError(f"{where}: missing or malformed {key!r}")
    return d[key]


def read_results(path: str | os.PathLike) -> Results:
    """Read a results file, naming the file and key when it is not in this format."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: results file does not exist") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a JSON results file ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise DataError(f"{path}: not a results file (expected \"schema\": \"{SCHEMA}\")")
    entries = []
    for i, r in enumerate(_need(doc, "results", list, str(path))):
        where = f"{path}: results[{i}]"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object")
        metrics = _need(r, "metrics", dict, where)
        metric = _need(r, "metric", str, where)
        if metric not in metrics:
            raise DataError(f"{where}: headline metric {metric!r} is not among its metrics")
        entries.append(ResultEntry(task=_need(r, "task", str, where), benchmark=_need(r, "benchmark", str, where),
                                   metric=metric, metrics={k: float(v) for k, v in metrics.items()},
                                   root=r.get("root"), format=r.get("format"), date=r.get("date") or ""))
    return Results(model=_need(doc, "model", str, str(path)), pretrained=doc.get("pretrained"), results=entries,
                   date=doc.get("date") or "")


def update_results(path: str | os.PathLike, model: str, pretrained: str | None, entries: list[ResultEntry]) -> Results:
    """Add `entries` to the results file at `path` (created if absent); refuses a file of another model."""
    path = Path(path)
    results = read_results(path) if path.exists() else Results(model, pretrained)
    if (results.model, results.pretrained) != (model, pretrained):
        raise DataError(f"{path}: holds results of model {results.model} (pretrained {results.pretrained}), "
                        f"not {model} (pretrained {pretrained}); write to another file")
    for entry in entries:
        results.add(entry)
    write_results(path, results)
    return results
