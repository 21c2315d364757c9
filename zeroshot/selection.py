"""Image-caption selection (SugarCrepe, Winoground): every image and caption of each instance encoded once, then
CLIP_benchmark's accuracies over the instance's image-caption cosine similarities (`caption_selection_metrics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from vlpretrain.errors import ConfigError
from vlpretrain.stopping import StopCheck
from zeroshot.classifier import encode_texts
from zeroshot.datasets import SelectionSet
from zeroshot.features import encode_images, resolve_device
from zeroshot.metrics import caption_selection_metrics


def instance_subset(n: int, max_instances: int | None) -> torch.Tensor:
    """Indices of at most `max_instances` evenly spaced instances of `n` (all of them by default)."""
    if max_instances is None or max_instances >= n:
        return torch.arange(n)
    if max_instances < 1:
        raise ConfigError(f"max_images: expected a positive number, got {max_instances}")
    return torch.linspace(0, n - 1, max_instances).round().long().unique()


def selection_scores(model: nn.Module, data: SelectionSet, *, tokenizer=None, batch_size: int = 256,
                     workers: int = 0, device: str | torch.device | None = None, max_instances: int | None = None,
                     progress: bool = False, desc: str = "instances",
                     should_stop: StopCheck | None = None) -> torch.Tensor:
    """Cosine similarities [instances, images, captions] of each kept instance's images and captions."""
    device = resolve_device(device, model)
    keep = instance_subset(len(data), max_instances)
    n_img, n_cap = data.images_per_instance, data.captions_per_instance
    image_ids = (keep[:, None] * n_img + torch.arange(n_img)).flatten()
    caption_ids = (keep[:, None] * n_cap + torch.arange(n_cap)).flatten()
    feats, ids = encode_images(model, Subset(data.images, image_ids.tolist()), batch_size=batch_size,
                               workers=workers, device=device, progress=progress, desc=desc, should_stop=should_stop)
    assert torch.equal(ids, image_ids), "the images dataset labels each image with its index"
    texts = encode_texts(model, tokenizer, [data.captions[i] for i in caption_ids.tolist()], batch_size=batch_size,
                         device=device, progress=progress, should_stop=should_stop)
    images = F.normalize(feats, dim=-1).view(len(keep), n_img, -1)
    captions = F.normalize(texts, dim=-1).view(len(keep), n_cap, -1)
    return images @ captions.transpose(1, 2)


def run_caption_selection(model: nn.Module, data: SelectionSet, *, headline: str = "acc", tokenizer=None,
                          batch_size: int = 256, workers: int = 0, device: str | torch.device | None = None,
                          max_images: int | None = None, progress: bool = False, desc: str = "instances",
                          should_stop: StopCheck | None = None, **_unused) -> dict[str, float]:
    """acc, text_acc, image_acc (see caption_selection_metrics) of `model` on a selection set; `max_images`
    keeps that many evenly spaced instances (a Winoground instance has two images)."""
    assert headline == "acc", headline
    scores = selection_scores(model, data, tokenizer=tokenizer, batch_size=batch_size, workers=workers,
                              device=device, max_instances=max_images, progress=progress, desc=desc,
                              should_stop=should_stop)
    return caption_selection_metrics(scores)
