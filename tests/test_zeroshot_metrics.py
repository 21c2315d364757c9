"""Metrics on hand-worked examples, and against scikit-learn as a reference."""

import math

import pytest
import torch

from zeroshot.metrics import classification_metrics, mean_per_class_recall, top_k_accuracy

# 4 images, 6 classes. Rankings: row 0: 2,1,0,...  row 1: 0,1,...  row 2: 5,4,3,2,1,0  row 3: 1,2,...
LOGITS = torch.tensor([
    [0.3, 0.5, 0.9, 0.0, 0.0, 0.0],
    [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    [0.0, 0.9, 0.8, 0.1, 0.0, 0.0],
])
TARGETS = torch.tensor([2, 1, 0, 2])


def test_top_k_by_hand():
    assert top_k_accuracy(LOGITS, TARGETS, 1) == 0.25  # only row 0
    assert top_k_accuracy(LOGITS, TARGETS, 2) == 0.75  # rows 0, 1 (target ranked 2nd) and 3
    assert top_k_accuracy(LOGITS, TARGETS, 5) == 0.75  # row 2's target is ranked last (6th)
    assert top_k_accuracy(LOGITS, TARGETS, 6) == 1.0


def test_mean_per_class_recall_by_hand():
    preds = LOGITS.argmax(dim=1)  # 2, 0, 5, 1
    # class 2: images 0 and 3, one right -> 0.5; class 1: image 1, wrong -> 0; class 0: image 2, wrong -> 0
    assert mean_per_class_recall(preds, TARGETS) == pytest.approx(0.5 / 3)
    # imbalance: accuracy 0.75 but per-class recall (1 + 0) / 2
    assert mean_per_class_recall(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])) == 0.5


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # predictions outside the targets, on purpose
def test_mean_per_class_recall_equals_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (500,), generator=g)
    preds = torch.where(torch.rand(500, generator=g) < 0.6, targets, torch.randint(0, 9, (500,), generator=g))
    assert mean_per_class_recall(preds, targets) == pytest.approx(balanced_accuracy_score(targets, preds), abs=1e-6)


def test_classification_metrics_dict():
    m = classification_metrics(LOGITS, TARGETS, headline="mean_per_class_recall")
    assert m == pytest.approx({"top1": 0.25, "top5": 0.75, "mean_per_class_recall": 0.5 / 3,
                               "headline": 0.5 / 3, "images": 4.0})
    few = classification_metrics(LOGITS[:, :5], TARGETS)  # 5 classes: no top-5
    assert "top5" not in few and few["headline"] == few["top1"]
    empty = classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert empty["images"] == 0 and math.isnan(empty["top1"])
