"""Classification metrics as pure functions, shared by zero-shot heads, linear probes and adapted heads.

Everything derives from each sample's classes ranked by score (`topk_metrics`), so a caller that keeps only the
top 5 of each row (the probe, at ImageNet scale) and one that has the whole logit matrix report the same numbers.
"""

from __future__ import annotations

import torch

METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "mean_per_class_recall": "mean per-class recall"}


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
