"""Retrieval recall@k and multi-label average precision on hand-worked cases, chunking, and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from vlpretrain.errors import DataError
from zeroshot.metrics import (
    average_precision,
    eleven_point_average_precision,
    multilabel_metrics,
    retrieval_metrics,
)

# Unit vectors, chosen so that every score is exact (products of 0, +-1, 0.6 and 0.8 with 0 and +-1).
IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
# captions 0, 1 describe image 0, caption 2 image 1, captions 3, 4 image 2
TEXTS = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.6, 0.8], [0.0, -1.0], [0.0, 1.0]])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
# scores text x image:
#   t0: [0.6, 0.8, -0.6]  its image 0 ranks 2nd      t1: [1, 0, -1]   image 0 1st
#   t2: [0.6, 0.8, -0.6]  image 1 1st                t3: [0, -1, 0]   image 2 ties image 0 at 0 -> rank 2
#   t4: [0, 1, 0]         image 2 ties image 0 below image 1 -> rank 3
# image -> text: image 0 scores [0.6, 1, 0.6, 0, 0]: caption 1 first -> rank 1
#                image 1 scores [0.8, 0, 0.8, -1, 1]: caption 2 (0.8) behind t4 (1) and t0 (0.8, tie) -> rank 3
#                image 2 scores [-0.6, -1, -0.6, 0, 0]: captions 3, 4 at 0 first -> rank 1


def test_recall_and_ranks_by_hand():
    m = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 3))
    t2i, i2t = [2, 1, 1, 2, 3], [1, 3, 1]
    for k in (1, 2, 3):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(sum(r <= k for r in t2i) / 5)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(sum(r <= k for r in i2t) / 3)
    assert m["image_retrieval_mean_rank"] == pytest.approx(9 / 5) and m["image_retrieval_median_rank"] == 2
    assert m["text_retrieval_mean_rank"] == pytest.approx(5 / 3) and m["text_retrieval_median_rank"] == 1
    recalls = [m[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in (1, 2, 3)]
    assert m["mean_recall"] == pytest.approx(sum(recalls) / 6) and m["headline"] == m["mean_recall"]
    assert (m["images"], m["texts"]) == (3, 5)


def test_ties_count_against_the_query():
    # every score equal: each text's image ties with the 2 other images, each image's captions with all others
    m = retrieval_metrics(torch.ones(3, 4), torch.ones(5, 4), TEXT_TO_IMAGE, ks=(1, 3, 5))
    assert m["image_retrieval_recall@1"] == 0 and m["image_retrieval_mean_rank"] == 3
    assert m["image_retrieval_recall@3"] == 1
    # image 0 has 2 captions and 3 wrong ones: rank 4; image 1: 4 wrong -> 5; image 2: 3 wrong -> 4
    assert m["text_retrieval_mean_rank"] == pytest.approx(13 / 3) and m["text_retrieval_recall@3"] == 0
    assert m["text_retrieval_recall@5"] == 1


def test_several_captions_count_once_and_features_are_normalised():
    # lengths differ on purpose: only directions count
    images = torch.tensor([[7.0, 0.0], [0.0, 0.5]])
    texts = torch.tensor([[3.0, 0.0], [3.0, 4.0], [0.4, 0.3]])  # image 0, image 0, image 1
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0 scores its captions 1 and 0.6, image 1's 0.8: the better of its two ranks first, once
    # image 1 scores its caption 0.6, behind caption 1 of image 0 (0.8): rank 2
    assert m["text_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@2"] == 1
    assert m["text_retrieval_mean_rank"] == 1.5 and m["text_retrieval_median_rank"] == 1.5
    # text -> image: caption 0 finds image 0 first; caption 1 (0.6 vs 0.8) and caption 2 (0.6 vs 0.8) second
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3) and m["image_retrieval_recall@2"] == 1


def brute_force_ranks(images, texts, text_to_image):
    """The definition written directly on the full score matrix (the test's oracle)."""
    s = torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(images, dim=-1).T
    t2i = [1 + int(((s[t] >= s[t, g]) & (torch.arange(len(images)) != g)).sum()) for t, g in enumerate(text_to_image)]
    i2t = []
    for i in range(len(images)):
        mine = text_to_image == i
        i2t.append(1 + int(((s[:, i] >= s[mine, i].max()) & ~mine).sum()))
    return torch.tensor(t2i), torch.tensor(i2t)


@pytest.mark.parametrize("chunk, query_chunk", [(1, 1), (3, 2), (7, 5), (10_000, 10_000)])
def test_chunked_equals_unchunked_and_the_definition(chunk, query_chunk):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(23, 8, generator=g)
    text_to_image = torch.cat([torch.arange(23), torch.randint(0, 23, (31,), generator=g)])
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), 8, generator=g)
    texts[5] = texts[40]  # a duplicate caption of another image: an exact tie
    full = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk=10_000, query_chunk=10_000)
    assert retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk=chunk, query_chunk=query_chunk) == full
    t2i, i2t = brute_force_ranks(images, texts, text_to_image)
    for k in (1, 5, 10):
        assert full[f"image_retrieval_recall@{k}"] == pytest.approx(float((t2i <= k).float().mean()))
        assert full[f"text_retrieval_recall@{k}"] == pytest.approx(float((i2t <= k).float().mean()))
    assert full["image_retrieval_median_rank"] == pytest.approx(float(t2i.float().quantile(0.5)))  # 54 texts: midpoint
    assert full["text_retrieval_mean_rank"] == pytest.approx(float(i2t.float().mean()))


def test_bad_inputs_name_the_problem():
    with pytest.raises(DataError, match="image 1 has no caption"):
        retrieval_metrics(IMAGES, TEXTS[:2], torch.tensor([0, 2]))
    with pytest.raises(DataError, match="one image index per text"):
        retrieval_metrics(IMAGES, TEXTS, torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="outside 0..2"):
        retrieval_metrics(IMAGES, TEXTS, torch.tensor([0, 1, 2, 3, 0]))


def test_average_precision_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 6)).astype(np.float32)  # few distinct values: many ties
    targets = (rng.random((40, 6)) < 0.3).astype(np.int64)
    targets[:, 5] = 0  # a class without positives
    ap = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    for c in range(5):
        assert float(ap[c]) == pytest.approx(average_precision_score(targets[:, c], scores[:, c]))
    assert math.isnan(float(ap[5]))
    m = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    assert m["mean_average_precision"] == pytest.approx(float(ap[:5].mean())) and m["images"] == 40
    assert m["headline"] == m["mean_average_precision"]


def test_eleven_point_average_precision_by_hand():
    # ranking: +, -, +, -, - with 2 positives: (recall, precision) points (0.5, 1), (1, 2/3)
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = torch.tensor([[1], [0], [1], [0], [0]])
    # recall levels 0..0.5 (6 of them) take precision 1, levels 0.6..1 (5) take 2/3
    assert float(eleven_point_average_precision(scores, targets)[0]) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert float(average_precision(scores, targets)[0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
