"""Zero-shot evaluation of a model on a registered benchmark: head, image features, logits, metrics.

Images are encoded by `zeroshot.features.encode_images` (the one feature pass, shared with the probe); `evaluate`
is the whole task on one benchmark; `evaluate_suite` runs several and returns results-file entries (what
`zeroshot eval` and the trainer write). The benchmark's task picks the runner: `run_zeroshot` (classification),
`run_multilabel` (multi-label classification, average precision) or `zeroshot.retrieve.run_retrieval`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.stopping import StopCheck, check_stop
from zeroshot.classifier import build_classifier
from zeroshot.datasets import Benchmark, EvalSet, get_benchmark
from zeroshot.features import encode_images, resolve_device, spread_subset
from zeroshot.metrics import classification_metrics, multilabel_metrics
from zeroshot.results import ResultEntry
from zeroshot.retrieve import run_retrieval


def run_zeroshot(model: nn.Module, data: EvalSet, *, headline: str = "top1", tokenizer=None, batch_size: int = 256,
                 workers: int = 0, device: str | torch.device | None = None, max_images: int | None = None,
                 progress: bool = False, desc: str = "zeroshot", cache_dir: str | os.PathLike | None = None,
                 should_stop: StopCheck | None = None) -> dict[str, float]:
    """Metrics of the zero-shot head built from `data`'s prompts on `data`'s images (see evaluate)."""
    device = resolve_device(device, model)
    head = build_classifier(model, tokenizer, data.classnames, data.templates, device=device, cache_dir=cache_dir,
                            should_stop=should_stop)
    return head_metrics(model, head, data, headline=headline, batch_size=batch_size, workers=workers, device=device,
                        max_images=max_images, progress=progress, desc=desc, should_stop=should_stop)


def head_metrics(model: nn.Module, head: torch.Tensor, data: EvalSet, *, headline: str = "top1",
                 batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                 max_images: int | None = None, progress: bool = False, desc: str = "images",
                 should_stop: StopCheck | None = None) -> dict[str, float]:
    """Metrics of a classification head (embed_dim, classes), zero-shot or adapted, on `data`'s images."""
    feats, labels = encode_images(model, spread_subset(data.dataset, max_images), batch_size=batch_size,
                                  workers=workers, device=device, progress=progress, desc=desc,
                                  should_stop=should_stop)
    return classification_metrics(F.normalize(feats, dim=-1) @ head.float().cpu(), labels, headline=headline)


def run_multilabel(model: nn.Module, data: EvalSet, *, headline: str = "mean_average_precision", tokenizer=None,
                   batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                   max_images: int | None = None, progress: bool = False, desc: str = "zeroshot",
                   cache_dir: str | os.PathLike | None = None, should_stop: StopCheck | None = None) -> dict[str, float]:
    """Average-precision metrics of the zero-shot head on a multi-label set (`data.targets`, see multilabel_metrics)."""
    assert data.targets is not None, "a multi-label EvalSet carries its targets"
    device = resolve_device(device, model)
    head = build_classifier(model, tokenizer, data.classnames, data.templates, device=device, cache_dir=cache_dir,
                            should_stop=should_stop)
    feats, index = encode_images(model, spread_subset(data.dataset, max_images), batch_size=batch_size,
                                 workers=workers, device=device, progress=progress, desc=desc, should_stop=should_stop)
    return multilabel_metrics(F.normalize(feats, dim=-1) @ head.cpu(), data.targets[index])


def _runner(task: str) -> tuple[str, Callable[..., dict[str, float]]]:
    """The results-file task name and the run function of a benchmark task."""
    return {"classification": ("zeroshot", run_zeroshot), "multilabel": ("zeroshot", run_multilabel),
            "retrieval": ("retrieval", run_retrieval)}[task]


def entry_task(bench: Benchmark) -> str:
    """The results-file task of `bench`'s zero-shot entry: "retrieval" for retrieval benchmarks, else "zeroshot"."""
    return _runner(bench.task)[0]


def evaluate(model: nn.Module, benchmark: str, root: str | Path, *, tokenizer=None, transform: Callable | None = None,
             batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
             max_images: int | None = None, format: str | None = None, progress: bool = True,
             split: str = "test", cache_dir: str | os.PathLike | None = None,
             language: str | None = None) -> dict[str, float]:
    """Zero-shot metrics of `model` on a registered benchmark read from `root`, for the benchmark's task.

    Classification returns top1, top5 (with more than 5 classes), mean_per_class_recall, headline (the benchmark's
    headline metric, named by `get_benchmark(benchmark).metric`) and images; multi-label and retrieval benchmarks
    return `multilabel_metrics` and `retrieval_metrics` (zeroshot.metrics). `transform` defaults to the model's evaluation
    preprocessing, `tokenizer` to open_clip's at the model's context length; `max_images` evaluates an evenly
    spaced subset; `format` forces a layout (default: detected from the files under `root`); `language` picks the
    class names and templates (or a retrieval set's captions) of that language (default English; see
    `zeroshot list --languages`). The model is moved to `device` (default: where it is) and left in the mode it was in.
    """
    bench = get_benchmark(benchmark, language)
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    data = bench.load(root, split=split, transform=transform, format=format)
    return _runner(bench.task)[1](model, data, headline=bench.metric, tokenizer=tokenizer, batch_size=batch_size,
                        workers=workers, device=device, max_images=max_images, progress=progress, desc=bench.name,
                        cache_dir=cache_dir)


def evaluate_suite(model: nn.Module, benchmarks: Sequence[str], root: str | Path, *, tokenizer=None,
                   transform: Callable | None = None, batch_size: int = 256, workers: int = 0,
                   device: str | torch.device | None = None, max_images: int | None = None, format: str | None = None,
                   progress: bool = True, cache_dir: str | os.PathLike | None = None,
                   on_result: Callable[[ResultEntry], None] | None = None,
                   should_stop: StopCheck | None = None, language: str | None = None) -> list[ResultEntry]:
    """Zero-shot entries for several benchmarks under `root` (one sub-folder each, or the benchmark's own folder).

    Every name is looked up before any data is read, so a typo fails at once; `on_result` sees each entry as it
    is done. Entries of retrieval benchmarks have task "retrieval", the others "zeroshot". `should_stop` is asked
    between benchmarks and batches: a stop raises `vlpretrain.stopping.Interrupted`, the finished entries having
    reached `on_result`. `language` applies to every benchmark (each must have it); entries record it.
    """
    benches = [get_benchmark(name, language) for name in benchmarks]
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    entries = []
    for bench in benches:
        check_stop(should_stop)
        data = bench.load(root, transform=transform, format=format)
        task, run = _runner(bench.task)
        metrics = run(model, data, headline=bench.metric, tokenizer=tokenizer, batch_size=batch_size,
                      workers=workers, device=device, max_images=max_images, progress=progress,
                      desc=bench.name, cache_dir=cache_dir, should_stop=should_stop)
        entries.append(ResultEntry(task, bench.name, bench.metric, metrics, str(data.root), data.format,
                                   language=bench.language))
        if on_result is not None:
            on_result(entries[-1])
    return entries
