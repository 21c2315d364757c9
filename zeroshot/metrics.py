"""Metrics as pure functions: classification (zero-shot heads, probes, adapted heads), multi-label average
precision and image-text retrieval recall (zero-shot retrieval and validation during training).

Classification derives from each sample's classes ranked by score (`topk_metrics`), so a caller that keeps only the
top 5 of each row (the probe, at ImageNet scale) and one that has the whole logit matrix report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlpretrain.errors import DataError

METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "mean_per_class_recall": "mean per-class recall",
                "mean_average_precision": "mean average precision", "mean_recall": "mean of retrieval recalls"}


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows whose target is among the k highest logits."""
    assert logits.ndim == 2 and len(logits) == len(targets) and 1 <= k <= logits.shape[1]
    if len(targets) == 0:
        return float("nan")
    topk = logits.topk(k, dim=1).indices
    return (topk == targets.view(-1, 1)).any(dim=1).float().mean().item()


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Recall averaged over the classes that occur in `targets` (scikit-learn's balanced accuracy)."""
    assert predictions.shape == targets.shape
    if len(targets) == 0:
        return float("nan")
    classes, inverse = targets.unique(return_inverse=True)
    hits = torch.zeros(len(classes), device=targets.device).index_add_(0, inverse, (predictions == targets).float())
    counts = torch.bincount(inverse, minlength=len(classes)).float()
    return (hits / counts).mean().item()


def topk_metrics(top: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 (more than 5 classes) and mean per-class recall over the classes present in `labels`, as
    fractions, from each sample's predicted classes `top` [N, k] in decreasing score order (k >= min(5, C))."""
    labels = labels.to(top.device).long()
    if len(labels) == 0:
        out = {"top1": float("nan")}
    else:
        out = {"top1": float((top[:, 0] == labels).float().mean())}
    if num_classes > 5:
        out["top5"] = float((top[:, :5] == labels[:, None]).any(1).float().mean()) if len(labels) else float("nan")
    out["mean_per_class_recall"] = mean_per_class_recall(top[:, 0], labels)
    return out


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, headline: str = "top1") -> dict[str, float]:
    """top1, top5 (only with more than 5 classes), mean_per_class_recall, `headline` (a copy of the benchmark's
    headline metric) and images (the count evaluated), from logits [N, classes]."""
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices
    out = topk_metrics(top, targets, num_classes)
    assert headline in out, f"unknown headline metric {headline}"
    out["headline"] = out[headline]
    out["images"] = float(len(targets))
    return out


def _curves(scores: torch.Tensor, targets: torch.Tensor):
    """Per class with positives: (class, recall, precision) at each distinct score threshold, highest first; tied
    scores form one threshold, so nothing depends on the order of tied samples."""
    assert scores.shape == targets.shape and scores.ndim == 2
    for c in range(scores.shape[1]):
        s, order = scores[:, c].double().sort(descending=True)
        y = targets[order, c].double()
        if y.sum() == 0:
            continue
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]  # the last sample of each run of equal scores closes a threshold
        tp = y.cumsum(0)[last]
        yield c, tp / y.sum(), tp / torch.arange(1, len(s) + 1, dtype=torch.float64)[last]


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each class (column) [C], scikit-learn's `average_precision_score` definition:
    sum over distinct score thresholds of (recall step) x precision. A class without positives gets NaN."""
    out = torch.full((scores.shape[1],), float("nan"))
    for c, recall, precision in _curves(scores, targets):
        out[c] = float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())
    return out


def eleven_point_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PASCAL VOC2007's 11-point interpolated AP of each class [C] (the CLIP paper's VOC2007 metric): the mean over
    recall levels 0, 0.1, ..., 1 of the best precision at that recall or more. NaN for a class without positives."""
    out = torch.full((scores.shape[1],), float("nan"))
    levels = torch.linspace(0, 1, 11, dtype=torch.float64)
    for c, recall, precision in _curves(scores, targets):
        best = [precision[recall >= t].max() if (recall >= t).any() else precision.new_zeros(()) for t in levels]
        out[c] = float(torch.stack(best).mean())
    return out


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """mean_average_precision (CLIP_benchmark's metric; scikit-learn's AP per class), mean_average_precision_11point
    (VOC2007's and the CLIP paper's), headline (the former) and images, from scores and 0/1 targets [N, classes].
    Means are over the classes with at least one positive image."""
    ap = average_precision(scores, targets)
    ap11 = eleven_point_average_precision(scores, targets)
    present = ~ap.isnan()
    out = {"mean_average_precision": float(ap[present].mean()) if present.any() else float("nan"),
           "mean_average_precision_11point": float(ap11[present].mean()) if present.any() else float("nan")}
    out["headline"] = out["mean_average_precision"]
    out["images"] = float(len(targets))
    return out


def _first_hit_ranks(queries: torch.Tensor, query_group: torch.Tensor, candidates: torch.Tensor,
                     candidate_group: torch.Tensor, positives: list[torch.Tensor], chunk: int,
                     query_chunk: int, device: torch.device) -> torch.Tensor:
    """For each query, 1 + the number of wrong candidates (another group) scoring at least as high as its best right
    candidate (same group), computed block by block so that at most query_chunk x (chunk + positives) scores exist
    at a time. Each block also scores the query's own positives, so the comparison uses numbers from one matmul."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for q0 in range(0, len(queries), query_chunk):
        q = F.normalize(queries[q0:q0 + query_chunk].to(device).float(), dim=-1)
        qg = query_group[q0:q0 + query_chunk].to(device)
        pos = positives[q0:q0 + query_chunk]
        owner = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(pos)]).to(device)
        pos_feats = F.normalize(candidates[torch.cat(pos)].to(device).float(), dim=-1)
        above = torch.zeros(len(q), dtype=torch.long, device=device)
        for c0 in range(0, len(candidates), chunk):
            c = F.normalize(candidates[c0:c0 + chunk].to(device).float(), dim=-1)
            scores = q @ torch.cat([c, pos_feats]).T
            right = scores[owner, len(c) + torch.arange(len(owner), device=device)]
            best = torch.full((len(q),), float("-inf"), device=device).scatter_reduce(0, owner, right, "amax")
            wrong = candidate_group[c0:c0 + chunk].to(device)[None, :] != qg[:, None]
            above += ((scores[:, :len(c)] >= best[:, None]) & wrong).sum(1)
        ranks[q0:q0 + query_chunk] = (above + 1).cpu()
    return ranks


def _rank_metrics(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_recall@{k}": float((ranks <= k).float().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.float().mean())
    out[f"{prefix}_median_rank"] = float(ranks.float().quantile(0.5))
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, *,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 8192, query_chunk: int = 256,
                      device: str | torch.device | None = None) -> dict[str, float]:
    """Recall@k, mean and median rank of both retrieval directions, with CLIP_benchmark's names:

    image_retrieval_*  text -> image: a text's query is a hit at k when its one image ranks in the top k
    text_retrieval_*   image -> text: an image's query is a hit at k when any of its captions ranks in the top k
    mean_recall        the mean of all those recalls (the headline); plus images and texts (the counts)

    Features [images, D] and [texts, D] are L2-normalised here (cosine similarity); `text_to_image[t]` is the index
    of caption t's image. Ranks are 1-based and ties count against the query: the rank of the first right answer
    is 1 + the number of wrong answers scoring at least as much, so a model giving equal scores everywhere gets
    recall 0, not an order-dependent number. Scores are computed `chunk` candidates x `query_chunk` queries at a
    time on `device` (default: the features' device), so memory stays bounded for 100k x 500k pairs; only one rank
    per query is kept. Mean rank is the arithmetic mean, median rank the midpoint of the two middle values for an
    even count. Every image needs at least one caption.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    n_images, n_texts = len(image_features), len(text_features)
    if text_features.ndim != 2 or image_features.ndim != 2 or text_features.shape[1] != image_features.shape[1]:
        raise DataError(f"features must be [images, D] and [texts, D], got {tuple(image_features.shape)} and "
                        f"{tuple(text_features.shape)}")
    if text_to_image.shape != (n_texts,) or n_texts == 0:
        raise DataError(f"text_to_image must give one image index per text ({n_texts}), got shape "
                        f"{tuple(text_to_image.shape)}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_images:
        raise DataError(f"text_to_image holds image indices outside 0..{n_images - 1}")
    counts = torch.bincount(text_to_image, minlength=n_images)
    if bool((counts == 0).any()):
        raise DataError(f"image {int((counts == 0).nonzero()[0])} has no caption "
                        f"({int((counts == 0).sum())} images without one); every image needs at least one")
    device = torch.device(device) if device is not None else image_features.device
    image_ids = torch.arange(n_images)
    captions_of = torch.split(text_to_image.argsort(stable=True), counts.tolist())
    t2i = _first_hit_ranks(text_features, text_to_image, image_features, image_ids,
                           list(text_to_image.split(1)), chunk, query_chunk, device)
    i2t = _first_hit_ranks(image_features, image_ids, text_features, text_to_image, list(captions_of),
                           chunk, query_chunk, device)
    out = {**_rank_metrics(t2i, ks, "image_retrieval"), **_rank_metrics(i2t, ks, "text_retrieval")}
    recalls = [v for k, v in out.items() if "_recall@" in k]
    out["mean_recall"] = sum(recalls) / len(recalls)
    out["headline"] = out["mean_recall"]
    out["images"], out["texts"] = float(n_images), float(n_texts)
    return out
