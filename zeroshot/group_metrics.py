"""Metrics of DataComp's WILDS, fairness and association tasks, as pure functions of predictions and metadata.

The definitions are DataComp's (mlfoundations/datacomp, `eval_utils/wilds_eval.py`, `fairness_eval.py`,
`wino_eval.py`), which use the WILDS package's metrics and groupers:
- a group is one value of a metadata field; the groups are 0 .. the field's largest value, empty ones included;
- `<metric>_<field>:<g>` is the mean of the per-sample metric over group g (NaN when empty), `count_<field>:<g>`
  its size, `<metric>_avg` the mean over all samples and `<metric>_wg` the worst (lowest) non-empty group;
- macro F1 and recall are scikit-learn's over the classes present in the labels (WILDS' `F1(average="macro")`);
- WinoGAViL: the cue's k associations are predicted as the k candidates scoring highest, scored by the Jaccard
  index of predicted and true sets, averaged over instances with 5, 6, 10 and 12 candidates and their ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zeroshot.metrics import mean_per_class_recall


def group_breakdown(correct: torch.Tensor, groups: torch.Tensor, name: str, field: str) -> dict[str, float]:
    """`name`_avg, `name`_`field`:g and count_`field`:g per group, and `name`_wg (the worst non-empty group)."""
    correct = correct.double()
    groups = groups.long()
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    out = {f"{name}_avg": float(correct.mean()) if len(correct) else float("nan")}
    present = []
    for g in range(n_groups):
        member = groups == g
        count = int(member.sum())
        value = float(correct[member].mean()) if count else float("nan")
        out[f"{name}_{field}:{g}"] = value
        out[f"count_{field}:{g}"] = float(count)
        if count:
            present.append(value)
    out[f"{name}_wg"] = min(present) if present else float("nan")
    return out


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """scikit-learn's f1_score(labels, predictions, average="macro", labels=unique(labels)): the mean over the
    classes present in `labels` of 2TP / (2TP + FP + FN)."""
    scores = []
    for c in labels.unique():
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def iwildcam_metrics(logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's iWildCam: acc_avg, recall-macro_all and F1-macro_all (its headline), over all samples."""
    pred = logits.argmax(1)
    return {"acc_avg": float((pred == labels).double().mean()),
            "recall-macro_all": mean_per_class_recall(pred, labels),
            "F1-macro_all": macro_f1(pred, labels)}


def camelyon17_metrics(logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's Camelyon17: accuracy per slide (metadata field 1) and the worst slide (headline: acc1)."""
    return group_breakdown(logits.argmax(1) == labels, metadata[:, 1], "acc", "slide")


def fmow_metrics(logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's FMoW: accuracy per year (acc_worst_year) and per region (acc_worst_region, its headline); fields
    are (region, year). DataComp's grouper has no names for regions, so its "Other" exclusion never applies."""
    correct = logits.argmax(1) == labels
    out = group_breakdown(correct, metadata[:, 1], "acc", "year")
    out["acc_worst_year"] = out.pop("acc_wg")
    regions = group_breakdown(correct, metadata[:, 0], "acc", "region")
    out.update({k: v for k, v in regions.items() if k not in ("acc_avg", "acc_wg")})
    out["acc_worst_region"] = regions["acc_wg"]
    return out


def dollar_street_metrics(logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's Dollar Street: top-5 accuracy per income group (field 0) and the worst group, acc_top5_wg."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return group_breakdown((top5 == labels[:, None]).any(1), metadata[:, 0], "acc_top5", "income_ds")


def geode_metrics(logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """DataComp's GeoDE: accuracy per region (field 0) and the worst region, acc_wg."""
    return group_breakdown(logits.argmax(1) == labels, metadata[:, 0], "acc", "region")


def association_jaccard(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """One WinoGAViL instance: the k = truth.sum() highest-scoring candidates against the true associations, as
    |predicted & true| / |predicted | true|. As in DataComp (numpy `argsort()[-k:]`), k = 0 predicts every
    candidate."""
    k = int(truth.sum())
    order = scores.argsort(stable=True)
    predicted = torch.zeros_like(truth, dtype=torch.bool)
    predicted[order[len(order) - k:] if k else order] = True
    truth = truth.bool()
    union = int((predicted | truth).sum())
    return int((predicted & truth).sum()) / union if union else 0.0


def association_metrics(scores: Sequence[torch.Tensor], truths: Sequence[torch.Tensor]) -> dict[str, float]:
    """avg_jaccard_score, jaccard_score_{5,6,10,12} (by candidates), jaccard_score_5-6, jaccard_score_10-12 (the
    headline), headline and instances, from each instance's candidate scores and 0/1 true associations."""
    jaccards = torch.tensor([association_jaccard(s, t) for s, t in zip(scores, truths, strict=True)],
                            dtype=torch.float64)
    sizes = torch.tensor([len(s) for s in scores])

    def mean(mask: torch.Tensor) -> float:
        return float(jaccards[mask].mean()) if bool(mask.any()) else float("nan")

    out = {"avg_jaccard_score": mean(torch.ones_like(sizes, dtype=torch.bool))}
    for n in (5, 6, 10, 12):
        out[f"jaccard_score_{n}"] = mean(sizes == n)
    out["jaccard_score_5-6"] = mean(sizes <= 6)
    out["jaccard_score_10-12"] = mean(sizes >= 10)
    out["headline"] = out["jaccard_score_10-12"]
    out["instances"] = float(len(jaccards))
    return out
