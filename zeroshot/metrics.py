"""Metrics as pure functions: classification (zero-shot heads, probes, adapted heads), multi-label average
precision, image-text retrieval recall (`vlpretrain.retrieval`, shared with the trainer's validation) and
image-caption selection (SugarCrepe, Winoground).

Classification derives from each sample's classes ranked by score (`topk_metrics`), so a caller that keeps only the
top 5 of each row (the probe, at ImageNet scale) and one that has the whole logit matrix report the same numbers.
"""

from __future__ import annotations

import torch

from vlpretrain.retrieval import retrieval_metrics

__all__ = ["METRIC_NAMES", "average_precision", "caption_selection_metrics", "classification_metrics",
           "eleven_point_average_precision",
           "mean_per_class_recall", "multilabel_metrics", "retrieval_metrics", "top_k_accuracy", "topk_metrics"]

METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "mean_per_class_recall": "mean per-class recall",
                "mean_average_precision": "mean average precision", "mean_recall": "mean of retrieval recalls",
                "mean_recall@1": "mean of image and text recall@1", "jaccard_score_10-12": "Jaccard index, 10-12 "
                "candidates", "F1-macro_all": "macro F1", "acc_worst_region": "worst-region accuracy",
                "acc_top5_wg": "worst-income-group top-5 accuracy", "acc_wg": "worst-group accuracy",
                "acc": "instances matched entirely"}


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


def caption_selection_metrics(scores: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's image_caption_selection metrics from image-caption scores [instances, I, T], where image i of
    an instance belongs with caption i and captions past the I-th are negatives (SugarCrepe: I=1, T=2; Winoground:
    I=T=2). With m = min(I, T), over instances:

    text_acc   each of the first m images scores its own caption highest (Winoground's text score)
    image_acc  each of the first m captions scores its own image highest (Winoground's image score; always 1 with
               one image, as for SugarCrepe)
    acc        both (Winoground's group score; SugarCrepe's accuracy); also `headline`
    plus instances and images (the counts). Ties go to the lower index, as torch's argmax does, so an equal score
    counts for image/caption 0 and against the others: CLIP_benchmark's rule, not Winoground's strict inequality.
    """
    assert scores.ndim == 3, f"scores must be [instances, images, captions], got {tuple(scores.shape)}"
    n, n_images, n_captions = scores.shape
    m = min(n_images, n_captions)
    right = torch.arange(m)
    scores = scores.detach().float().cpu()
    text_ok = (scores.argmax(dim=2)[:, :m] == right).all(dim=1)
    image_ok = (scores.argmax(dim=1)[:, :m] == right).all(dim=1)
    out = {"acc": float((text_ok & image_ok).float().mean()) if n else float("nan"),
           "text_acc": float(text_ok.float().mean()) if n else float("nan"),
           "image_acc": float(image_ok.float().mean()) if n else float("nan")}
    out["headline"] = out["acc"]
    out["instances"], out["images"] = float(n), float(n * n_images)
    return out
