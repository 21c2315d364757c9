"""Accuracy on the test images that overlap the training data and on the clean rest (CLIP paper, section 5).

A test image overlaps when a training image is a near duplicate of it: the cosine of their thumbnail descriptors
(vlpretrain.curation's: differences of a 12x12 grey image, robust to resizing and re-encoding) is at least a
threshold (by default curation's, `NEAR_COSINE`). The training shards' thumbnails come from curation's embedding cache, so a second evaluation against the same shards reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from vlpretrain.curation.decontaminate import overlapping, test_set
from vlpretrain.curation.embed import NEAR_COSINE, embed_shards, load_embeddings
from vlpretrain.curation.read import input_shards
from vlpretrain.errors import ConfigError
from vlpretrain.stopping import StopCheck
from zeroshot.classifier import build_classifier
from zeroshot.datasets import get_benchmark
from zeroshot.features import encode_images, resolve_device, spread_subset
from zeroshot.metrics import classification_metrics
from zeroshot.results import ResultEntry

DEFAULT_CACHE = Path.home() / ".cache" / "vlpretrain" / "curation"


def overlap_mask(benchmark: str, root: str | Path, shards: str, *, threshold: float | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False) -> np.ndarray:
    """bool [test images]: which test images of `benchmark` have a near duplicate in the shards `shards` names."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    urls = input_shards(shards)
    embed_shards(urls, cache, None, progress=progress)
    train = load_embeddings(urls, cache, None)
    assert train is not None
    test = test_set(benchmark, root, None, cache)
    return overlapping(test.thumbs, train.thumbs[train.valid], NEAR_COSINE if threshold is None else threshold)


def split_metrics(logits: torch.Tensor, labels: torch.Tensor, overlap: torch.Tensor,
                  headline: str = "top1") -> dict[str, float]:
    """Metrics of all images, plus `overlap_*` and `clean_*` copies of top1 and the image counts, and the
    overlap's share of the images (`overlap_fraction`)."""
    out = classification_metrics(logits, labels, headline=headline)
    for name, mask in (("overlap", overlap), ("clean", ~overlap)):
        part = classification_metrics(logits[mask], labels[mask], headline=headline) if mask.any() else None
        out[f"{name}_top1"] = part["top1"] if part else float("nan")
        out[f"{name}_images"] = float(mask.sum())
    out["overlap_fraction"] = float(overlap.float().mean())
    return out


def evaluate_overlap(model: nn.Module, benchmark: str, root: str | Path, shards: str, *, tokenizer=None,
                     transform: Callable | None = None, threshold: float | None = None, batch_size: int = 256,
                     workers: int = 0, device: str | torch.device | None = None, max_images: int | None = None,
                     format: str | None = None, progress: bool = False, cache_dir: str | os.PathLike | None = None,
                     overlap_cache: str | os.PathLike | None = None,
                     should_stop: StopCheck | None = None) -> ResultEntry:
    """The zero-shot entry of a classification benchmark with its accuracy on overlapping and clean test images."""
    bench = get_benchmark(benchmark)
    if bench.task != "classification":
        raise ConfigError(f"--overlap-with: {bench.name} is a {bench.task} benchmark; overlap accuracy is for "
                          "classification benchmarks")
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    data = bench.load(root, transform=transform, format=format)
    mask = overlap_mask(bench.name, root, shards, threshold=threshold, cache_dir=overlap_cache, progress=progress)
    if len(mask) != len(data):
        raise ConfigError(f"{bench.name}: {len(mask)} test images found for the overlap but {len(data)} to "
                          "evaluate (another --format?)")
    subset = spread_subset(data.dataset, max_images)
    rows = list(subset.indices) if isinstance(subset, Subset) else list(range(len(mask)))
    device = resolve_device(device, model)
    head = build_classifier(model, tokenizer, data.classnames, data.templates, device=device, cache_dir=cache_dir,
                            should_stop=should_stop)
    feats, labels = encode_images(model, subset, batch_size=batch_size, workers=workers, device=device,
                                  progress=progress, desc=bench.name, should_stop=should_stop)
    logits = F.normalize(feats, dim=-1) @ head.float().cpu()
    metrics = split_metrics(logits, labels, torch.from_numpy(mask[rows]), headline=bench.metric)
    return ResultEntry("zeroshot", bench.name, bench.metric, metrics, str(data.root), data.format)
