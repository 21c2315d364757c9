"""Zero-shot evaluation of a model on a registered benchmark: head, image features, logits, metrics.

Images are encoded by `zeroshot.features.encode_images` (the one feature pass, shared with the probe); `evaluate`
is the whole task on one benchmark; `evaluate_suite` runs several and returns results-file entries (what
`zeroshot eval` and the trainer write). The benchmark's task picks the runner: `run_zeroshot` (classification;
sets with group metadata add their group metrics), `run_multilabel` (multi-label classification, average
precision), `zeroshot.retrieve.run_retrieval`, `run_association` (WinoGAViL's cue-to-images association) or
`zeroshot.selection.run_caption_selection` (SugarCrepe, Winoground).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from vlpretrain.stopping import StopCheck, check_stop
from zeroshot.classifier import build_classifier, encode_texts
from zeroshot.datasets import AssociationSet, Benchmark, EvalSet, get_benchmark
from zeroshot.features import encode_images, resolve_device, spread_subset
from zeroshot.group_metrics import association_metrics
from zeroshot.metrics import classification_metrics, multilabel_metrics
from zeroshot.prompts import Source, read_prompts
from zeroshot.results import ResultEntry
from zeroshot.retrieve import check_ks, run_retrieval
from zeroshot.selection import run_caption_selection


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
    """Metrics of a classification head (embed_dim, classes), zero-shot or adapted, on `data`'s images; a set with
    group metadata (`data.grouping`) adds its group metrics, and its headline may be one of them."""
    subset = spread_subset(data.dataset, max_images)
    feats, labels = encode_images(model, subset, batch_size=batch_size, workers=workers, device=device,
                                  progress=progress, desc=desc, should_stop=should_stop)
    logits = F.normalize(feats, dim=-1) @ head.float().cpu()
    if data.grouping is None or data.metadata is None:
        return classification_metrics(logits, labels, headline=headline)
    out = classification_metrics(logits, labels)
    rows = subset.indices if isinstance(subset, Subset) else range(len(labels))
    out.update(data.grouping.metrics(logits, labels, data.metadata[list(rows)]))
    out["headline"] = out[headline]
    return out


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


def cue_prompt(cue: str) -> str:
    """DataComp's WinoGAViL prompt: the cue lower-cased after "A", or "An" when it starts with a vowel."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in ('a', 'e', 'i', 'o', 'u') else 'A'} {cue}"


def run_association(model: nn.Module, data: AssociationSet, *, headline: str = "jaccard_score_10-12", tokenizer=None,
                    batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                    max_images: int | None = None, progress: bool = False, desc: str = "association",
                    should_stop: StopCheck | None = None, **_unused) -> dict[str, float]:
    """WinoGAViL's Jaccard metrics (zeroshot.group_metrics.association_metrics): each cue's prompt scored against
    its candidate images by cosine similarity; `max_images` keeps an evenly spaced subset of the instances."""
    device = resolve_device(device, model)
    chosen = spread_subset(list(range(len(data))), max_images)
    keep = chosen.indices if isinstance(chosen, Subset) else chosen
    wanted = set(keep)
    owners = [label for *_, label in data.images.samples]  # type: ignore[attr-defined]
    images = Subset(data.images, [i for i, owner in enumerate(owners) if owner in wanted])
    feats, owner = encode_images(model, images, batch_size=batch_size, workers=workers, device=device,
                                 progress=progress, desc=desc, should_stop=should_stop)
    texts = encode_texts(model, tokenizer, [cue_prompt(data.cues[i]) for i in keep], batch_size=batch_size,
                         device=device, should_stop=should_stop)
    feats, texts = F.normalize(feats, dim=-1), F.normalize(texts, dim=-1)
    scores = [feats[owner == i] @ texts[j] for j, i in enumerate(keep)]
    out = association_metrics(scores, [data.truths[i] for i in keep])
    out["headline"] = out[headline]
    out["images"] = float(len(feats))
    return out


def _runner(task: str) -> tuple[str, Callable[..., dict[str, float]]]:
    """The results-file task name and the run function of a benchmark task."""
    return {"classification": ("zeroshot", run_zeroshot), "multilabel": ("zeroshot", run_multilabel),
            "retrieval": ("retrieval", run_retrieval), "association": ("zeroshot", run_association),
            "caption_selection": ("image_caption_selection", run_caption_selection)}[task]


def entry_task(bench: Benchmark) -> str:
    """The results-file task of `bench`'s zero-shot entry: "retrieval" for retrieval benchmarks,
    "image_caption_selection" for SugarCrepe and Winoground, else "zeroshot"."""
    return _runner(bench.task)[0]


def _task_options(bench: Benchmark, recall_ks: Sequence[int] | None) -> dict:
    """Options only one task's runner takes: the recall@k cut-offs of retrieval."""
    return {"ks": check_ks(recall_ks)} if bench.task == "retrieval" and recall_ks is not None else {}


def evaluate(model: nn.Module, benchmark: str, root: str | Path, *, tokenizer=None, transform: Callable | None = None,
             batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
             max_images: int | None = None, format: str | None = None, progress: bool = True,
             split: str = "test", cache_dir: str | os.PathLike | None = None, language: str | None = None,
             classnames: Source = None, templates: Source = None,
             recall_ks: Sequence[int] | None = None) -> dict[str, float]:
    """Zero-shot metrics of `model` on a registered benchmark read from `root`, for the benchmark's task.

    Classification returns top1, top5 (with more than 5 classes), mean_per_class_recall, headline (the benchmark's
    headline metric, named by `get_benchmark(benchmark).metric`) and images; multi-label and retrieval benchmarks
    return `multilabel_metrics` and `retrieval_metrics`, SugarCrepe and Winoground `caption_selection_metrics`
    (zeroshot.metrics); DataComp's WILDS and fairness sets add their group metrics and WinoGAViL returns
    `association_metrics` (zeroshot.group_metrics). `transform` defaults to the model's evaluation preprocessing,
    `tokenizer` to open_clip's at the model's context length; `max_images` evaluates an evenly spaced subset (of
    WinoGAViL's cues); `format` forces a layout (default: detected from the files under `root`); `language` picks
    the class names and templates (or a retrieval set's captions) of that language (default English; see `zeroshot
    list --languages`). `classnames` and `templates` replace the benchmark's own (a file, "cupl" or values; see
    zeroshot.prompts); `recall_ks` are retrieval's recall@k cut-offs (default 1, 5, 10). The model is moved to
    `device` (default: where it is) and left in the mode it was in.
    """
    bench = get_benchmark(benchmark, language)
    custom = read_prompts([bench.name], classnames, templates)
    options = _task_options(bench, recall_ks)
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    data = bench.load(root, split=split, transform=transform, format=format)
    if isinstance(data, EvalSet):
        data = custom.apply(bench, data)
    return _runner(bench.task)[1](model, data, headline=bench.metric, tokenizer=tokenizer, batch_size=batch_size,
                        workers=workers, device=device, max_images=max_images, progress=progress, desc=bench.name,
                        cache_dir=cache_dir, **options)


def evaluate_suite(model: nn.Module, benchmarks: Sequence[str], root: str | Path, *, tokenizer=None,
                   transform: Callable | None = None, batch_size: int = 256, workers: int = 0,
                   device: str | torch.device | None = None, max_images: int | None = None, format: str | None = None,
                   progress: bool = True, cache_dir: str | os.PathLike | None = None,
                   on_result: Callable[[ResultEntry], None] | None = None, should_stop: StopCheck | None = None,
                   language: str | None = None, classnames: Source = None, templates: Source = None,
                   recall_ks: Sequence[int] | None = None) -> list[ResultEntry]:
    """Zero-shot entries for several benchmarks under `root` (one sub-folder each, or the benchmark's own folder).

    Every name, and the `classnames` / `templates` files, are checked before any data is read, so a typo fails at
    once; `on_result` sees each entry as it is done. Entries have the task of `entry_task`. `should_stop` is asked
    between benchmarks and batches: a stop raises `vlpretrain.stopping.Interrupted`, the finished entries having
    reached `on_result`. `language` applies to every benchmark (each must have it); entries record it. The other
    options are `evaluate`'s.
    """
    benches = [get_benchmark(name, language) for name in benchmarks]
    custom = read_prompts([b.name for b in benches], classnames, templates)
    options = {b.name: _task_options(b, recall_ks) for b in benches}
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    entries = []
    for bench in benches:
        check_stop(should_stop)
        data = bench.load(root, transform=transform, format=format)
        if isinstance(data, EvalSet):
            data = custom.apply(bench, data)
        task, run = _runner(bench.task)
        metrics = run(model, data, headline=bench.metric, tokenizer=tokenizer, batch_size=batch_size,
                      workers=workers, device=device, max_images=max_images, progress=progress,
                      desc=bench.name, cache_dir=cache_dir, should_stop=should_stop, **options[bench.name])
        entries.append(ResultEntry(task, bench.name, bench.metric, metrics, str(data.root), data.format,
                                   language=bench.language))
        if on_result is not None:
            on_result(entries[-1])
    return entries
