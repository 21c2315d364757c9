"""Zero-shot image-text retrieval: every image and every caption encoded once, then recall@k both ways.

Images go through `zeroshot.features.encode_images` and captions through `zeroshot.classifier.encode_texts` (the
feature passes classification uses); the ranking is `vlpretrain.retrieval.retrieval_metrics`, the pure function
the trainer's validation calls on its own features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from vlpretrain.errors import ConfigError
from vlpretrain.retrieval import retrieval_metrics
from vlpretrain.stopping import StopCheck
from zeroshot.classifier import encode_texts
from zeroshot.datasets import CaptionSet, get_benchmark
from zeroshot.features import encode_images, resolve_device, spread_subset

RECALL_KS = (1, 5, 10)


def run_retrieval(model: nn.Module, data: CaptionSet, *, headline: str = "mean_recall", tokenizer=None,
                  batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                  max_images: int | None = None, progress: bool = False, desc: str = "retrieval",
                  ks: Sequence[int] = RECALL_KS, should_stop: StopCheck | None = None, **_unused) -> dict[str, float]:
    """Retrieval metrics of `model` on a caption set (see retrieval_metrics); with `max_images`, an evenly spaced
    subset of the images and their captions only (a smaller gallery: higher recall than on the whole set)."""
    assert headline == "mean_recall", headline
    device = resolve_device(device, model)
    feats, ids = encode_images(model, spread_subset(data.images, max_images), batch_size=batch_size,
                               workers=workers, device=device, progress=progress, desc=desc, should_stop=should_stop)
    position = torch.full((len(data),), -1, dtype=torch.long)
    position[ids] = torch.arange(len(ids))
    owner = position[torch.as_tensor(data.text_to_image, dtype=torch.long)]
    kept = (owner >= 0).nonzero().flatten().tolist()
    texts = encode_texts(model, tokenizer, [data.captions[t] for t in kept], batch_size=batch_size,
                         device=device, progress=progress, should_stop=should_stop)
    return retrieval_metrics(feats, texts, owner[kept], ks=ks, device=device)


def retrieval(model: nn.Module, dataset: str, root: str | Path, *, tokenizer=None, transform: Callable | None = None,
              batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
              max_images: int | None = None, format: str | None = None, progress: bool = True,
              split: str = "test", ks: Sequence[int] = RECALL_KS, language: str | None = None) -> dict[str, float]:
    """Zero-shot retrieval metrics of `model` on a registered retrieval benchmark (flickr8k, flickr30k, mscoco,
    captions) read from `root`: image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> text),
    their mean and median ranks, mean_recall (= headline), images and texts.

    `transform` defaults to the model's evaluation preprocessing, `tokenizer` to open_clip's at the model's context
    length; `format` forces a layout (default: detected); `language` picks the captions of a multilingual set
    (Crossmodal-3600, XTD10, multilingual COCO; default English). The model is left in the mode it was in.
    """
    bench = get_benchmark(dataset, language)
    if bench.task != "retrieval":
        raise ConfigError(f"benchmark: {bench.name} is a {bench.task} benchmark, not a retrieval one "
                          f"(use zeroshot.evaluate)")
    if transform is None:
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    data = bench.load(root, split=split, transform=transform, format=format)
    assert isinstance(data, CaptionSet)
    return run_retrieval(model, data, tokenizer=tokenizer, batch_size=batch_size, workers=workers, device=device,
                         max_images=max_images, progress=progress, desc=bench.name, ks=ks)
