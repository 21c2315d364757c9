"""`linear_probe`: the CLIP paper's logistic-regression probe on a registered benchmark, from a model and a root.

Features of the train and test splits are extracted once per (model weights, benchmark, split) and cached; the
fit itself is in `zeroshot.logistic`. Results use the zero-shot metric names, so one results file holds both tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vlpretrain.stopping import StopCheck
from zeroshot.datasets import Benchmark, get_benchmark
from zeroshot.features import cached_features, spread_subset, weights_digest
from zeroshot.logistic import linear_probe_features

DEFAULT_CACHE = Path(os.environ.get("VLPRETRAIN_CACHE", Path.home() / ".cache" / "vlpretrain")) / "features"


def split_features(model: nn.Module, bench: Benchmark, root: str | os.PathLike, splits: Sequence[str], *,
                   batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                   max_images: int | None = None, format: str | None = None,
                   cache_dir: str | os.PathLike | None = None, progress: bool = False,
                   should_stop: StopCheck | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of each split of `bench`, from the feature cache or extracted once into it.

    The probe and few-shot adaptation share this, so either finds the image features the other extracted.
    """
    from vlpretrain.models import image_transform

    transform = image_transform(model, train=False)
    digest = weights_digest(model, scope="image")
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    features = {}
    for split in splits:
        key = f"{bench.name}/{split}" + (f"-max{max_images}" if max_images else "")

        def load(split: str = split):
            data = bench.load(root, split=split, transform=transform, format=format)
            return spread_subset(data.dataset, max_images)

        features[split] = cached_features(model, key, load, cache, digest=digest, batch_size=batch_size,
                                          device=device, workers=workers, progress=progress,
                                          should_stop=should_stop)
    return features


def linear_probe(model: nn.Module, benchmark: str, root: str | os.PathLike, *, shots: int | None = None,
                 l2: float | None = None, seed: int = 0, batch_size: int = 256, workers: int = 0,
                 device: str | torch.device | None = None, max_images: int | None = None, format: str | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False,
                 should_stop: StopCheck | None = None, language: str | None = None) -> dict[str, float]:
    """Linear-probe metrics of `model`'s frozen image features on `benchmark` (train split -> test split).

    Without `l2` the strength is swept on a validation split held out from train (CLIP protocol), then refitted on
    train + validation; `shots` keeps k training images per class. `max_images` caps each split (evenly spaced).
    Returns top1, top5, mean_per_class_recall, headline, images, num_train, l2 (and val_top1 when swept, shots
    when given). `should_stop` is asked between feature batches and l2 fits (see `encode_images`). The probe reads
    no text: `language` is only checked (the benchmark must have it), so a script can pass one language throughout.
    """
    bench = get_benchmark(benchmark, language)
    features = split_features(model, bench, root, ("train", "test"), batch_size=batch_size, workers=workers,
                              device=device, max_images=max_images, format=format, cache_dir=cache_dir,
                              progress=progress, should_stop=should_stop)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    out = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=len(bench.classnames), l2=l2,
                                shots=shots, seed=seed, device=device, progress=progress, should_stop=should_stop)
    out["images"] = out.pop("num_images")
    out["headline"] = out[bench.metric]
    if shots is not None:
        out["shots"] = float(shots)  # so a report can put it beside adapted heads at the same k
    return out
