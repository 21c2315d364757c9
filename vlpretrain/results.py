"""The results file: one JSON per model, one entry per (task, benchmark), shared by every evaluation task and the
trainer (which writes its `training` block even when it evaluates nothing, so the format lives here, low down).

    {
      "schema": "zeroshot-results/1",
      "model": "runs/demo/model.safetensors",       # checkpoint path or architecture name
      "pretrained": null,                           # weights given separately, if any
      "date": "2026-11-26T12:00:00+00:00",          # last write
      "results": [
        {"task": "zeroshot", "benchmark": "fashion-mnist", "metric": "top1",
         "root": "/usr/share/datasets/fashion-mnist", "format": "torchvision", "date": "2026-11-26T12:00:00+00:00",
         "metrics": {"top1": 0.71, "top5": 0.98, "mean_per_class_recall": 0.71, "headline": 0.71, "images": 10000.0}}
      ],
      "training": {"steps": 1000, "samples": 256000, "flops": 5.1e15, "energy_j": 2.4e6},  # a run's totals, if any
      "interrupted": {"date": "2026-11-26T12:05:00+00:00",                  # only when a stop cut an evaluation
                      "not_evaluated": [{"task": "linear_probe", "benchmark": "fashion-mnist"}]}
    }

`task` names the evaluation ("zeroshot", "retrieval", "linear_probe", ...); `metric` names the key of `metrics` that
is the benchmark's headline number (a retrieval entry's is "mean_recall", the mean of its recall@k both ways);
`language` (ISO 639-1, "en" when absent) the language of the prompts or captions. Writing an entry replaces the one
with the same task, benchmark and language.
`training` holds the totals of the run that trained the model (written by the trainer at its end; see
`vlpretrain.trainer`): optimizer steps, samples, model FLOPs (forward + backward) and, on GPUs, joules.
`interrupted` says that a SIGINT/SIGTERM cut an evaluation short: the entries it finished are in `results`, those
it did not reach are listed; writing one of them later takes it off the list, and the block goes with the last.
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
    language: str = "en"  # of the prompts or captions the metrics were measured with (ISO 639-1)

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies an entry in a results file: one per task, benchmark and language."""
        return self.task, self.benchmark, self.language

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
    training: dict[str, float] | None = None  # totals of the training run, when the trainer wrote this file
    interrupted: dict[str, Any] | None = None  # {"date", "not_evaluated": [{"task", "benchmark"}]} after a stop

    def add(self, entry: ResultEntry) -> None:
        """Add `entry`, replacing an earlier one for the same task, benchmark and language."""
        self.results = [r for r in self.results if r.key != entry.key]
        self.results.append(entry)
        if self.interrupted is not None:
            left = [t for t in self.interrupted["not_evaluated"]
                    if (t["task"], t["benchmark"], t.get("language", "en")) != entry.key]
            self.interrupted = {**self.interrupted, "not_evaluated": left} if left else None

    def mark_interrupted(self, not_evaluated: list[tuple[str, ...]]) -> None:
        """Record that a stop cut the evaluation short before these (task, benchmark[, language]) were evaluated."""
        left = [{"task": t[0], "benchmark": t[1], **({"language": t[2]} if len(t) > 2 and t[2] != "en" else {})}
                for t in not_evaluated]
        self.interrupted = {"date": now(), "not_evaluated": left}

    def get(self, task: str, benchmark: str, language: str = "en") -> ResultEntry | None:
        return next((r for r in self.results if r.key == (task, benchmark, language)), None)


def write_results(path: str | os.PathLike, results: Results) -> Path:
    """Write `results` atomically (temporary file, then rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results.date = now()
    doc = {"schema": SCHEMA, "model": results.model, "pretrained": results.pretrained, "date": results.date,
           "results": [asdict(r) for r in results.results],
           **({"training": results.training} if results.training is not None else {}),
           **({"interrupted": results.interrupted} if results.interrupted is not None else {})}
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
                                   root=r.get("root"), format=r.get("format"), date=r.get("date") or "",
                                   language=r.get("language") or "en"))
    training = doc.get("training")
    if training is not None and not isinstance(training, dict):
        raise DataError(f"{path}: malformed 'training' (expected an object)")
    interrupted = doc.get("interrupted")
    if interrupted is not None:
        left = interrupted.get("not_evaluated") if isinstance(interrupted, dict) else None
        if not isinstance(left, list) or not all(isinstance(t, dict) and isinstance(t.get("task"), str)
                                                 and isinstance(t.get("benchmark"), str) for t in left):
            raise DataError(f"{path}: malformed 'interrupted' (expected not_evaluated: [{{task, benchmark}}])")
    return Results(model=_need(doc, "model", str, str(path)), pretrained=doc.get("pretrained"), results=entries,
                   date=doc.get("date") or "", training=training, interrupted=interrupted)


def update_results(path: str | os.PathLike, model: str, pretrained: str | None, entries: list[ResultEntry],
                   training: dict[str, float] | None = None,
                   not_evaluated: list[tuple[str, ...]] | None = None) -> Results:
    """Add `entries` (and the training totals, replacing earlier ones, when given) to the results file at `path`
    (created if absent); refuses a file of another model. `not_evaluated` (task, benchmark) pairs mark the file
    interrupted: an evaluation cut short by a stop lists what it did not reach."""
    path = Path(path)
    results = read_results(path) if path.exists() else Results(model, pretrained)
    if (results.model, results.pretrained) != (model, pretrained):
        raise DataError(f"{path}: holds results of model {results.model} (pretrained {results.pretrained}), "
                        f"not {model} (pretrained {pretrained}); write to another file")
    for entry in entries:
        results.add(entry)
    if training is not None:
        results.training = dict(training)
    if not_evaluated is not None:
        results.mark_interrupted(not_evaluated)
    write_results(path, results)
    return results
