"""Classification metrics as pure functions of logits (N, classes) and integer targets (N,)."""

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
    classes = targets.unique()
    if len(classes) == 0:
        return float("nan")
    recalls = [(predictions[targets == c] == c).float().mean() for c in classes]
    return torch.stack(recalls).mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, headline: str = "top1") -> dict[str, float]:
    """top1, top5 (only with more than 5 classes), mean_per_class_recall, `headline` (a copy of the benchmark's
    headline metric) and images (the count evaluated)."""
    targets = targets.long()
    out = {"top1": top_k_accuracy(logits, targets, 1)}
    if logits.shape[1] > 5:
        out["top5"] = top_k_accuracy(logits, targets, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), targets)
    assert headline in out, f"unknown headline metric {headline}"
    out["headline"] = out[headline]
    out["images"] = float(len(targets))
    return out
