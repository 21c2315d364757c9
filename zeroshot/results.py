"""The results file (its format and writers: `vlpretrain.results`, shared with the trainer) and its export as
CLIP_benchmark's result files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlpretrain.errors import DataError
from vlpretrain.results import SCHEMA, ResultEntry, Results, read_results, update_results, write_results

__all__ = ["CLIP_BENCHMARK_KEYS", "SCHEMA", "ResultEntry", "Results", "clip_benchmark_results", "read_results",
           "update_results", "write_clip_benchmark", "write_results"]

# CLIP_benchmark's result files (clip_benchmark/cli.py: one JSON per model x dataset x task, exactly these keys).
CLIP_BENCHMARK_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
_CLIP_BENCHMARK_TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                         "linear_probe": "linear_probe"}


def _clip_benchmark_metrics(entry: ResultEntry, task: str) -> dict[str, float]:
    """Our metrics under CLIP_benchmark's names (acc5 is NaN where it has none, as CLIP_benchmark writes it)."""
    m = entry.metrics
    if task == "zeroshot_retrieval":
        return {k: v for k, v in m.items() if "_retrieval_recall@" in k}
    if "mean_average_precision" in m:
        return {"mean_average_precision": m["mean_average_precision"]}
    prefix = "lp_" if task == "linear_probe" else ""
    return {f"{prefix}acc1": m["top1"], f"{prefix}acc5": m.get("top5", float("nan")),
            f"{prefix}mean_per_class_recall": m["mean_per_class_recall"]}


def clip_benchmark_results(results: Results) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of CLIP_benchmark's result file for each entry it has a task for; file names follow
    its `{dataset}_{pretrained}_{model}_{language}_{task}.json` template with "/" made "_"."""
    from zeroshot.datasets import BENCHMARKS

    out = []
    for entry in results.results:
        task = _CLIP_BENCHMARK_TASKS.get(entry.task)
        if task is None:
            continue
        bench = BENCHMARKS.get(entry.benchmark)
        dataset = bench.result_name if bench is not None else entry.benchmark
        pretrained = results.pretrained or ""
        doc = {"dataset": dataset, "model": results.model, "pretrained": pretrained, "task": task,
               "metrics": _clip_benchmark_metrics(entry, task), "language": entry.language}
        slug = [Path(p).name if p else "none" for p in (pretrained, results.model)]
        name = f"{dataset}_{slug[0]}_{slug[1]}_{entry.language}_{task}.json".replace("/", "_")
        out.append((name, doc))
    return out


def write_clip_benchmark(results: Results, out_dir: str | os.PathLike) -> list[Path]:
    """Write CLIP_benchmark's result files of `results` into `out_dir`; returns their paths."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: CLIP_benchmark results are one file per benchmark; give a folder, not a file")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in clip_benchmark_results(results):
        paths.append(folder / name)
        paths[-1].write_text(json.dumps(doc) + "\n")  # json.dumps writes NaN as CLIP_benchmark's files hold it
    return paths
