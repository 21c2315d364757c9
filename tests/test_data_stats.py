"""Batch-diversity statistics, by hand: repeated captions, expected distinct captions, the ratio the loader checks."""

import pytest

from vlpretrain.data.stats import (
    CaptionDiversity,
    diversity_ratio,
    expected_distinct,
    repeated_caption_fraction,
)


def test_repeated_caption_fraction_by_hand():
    assert repeated_caption_fraction(["a", "b", "a", "c"]) == 0.5  # both "a" samples share their caption
    assert repeated_caption_fraction(["a", "b", "c"]) == 0.0
    assert repeated_caption_fraction(["a"] * 5) == 1.0
    assert repeated_caption_fraction([]) == 0.0


def test_expected_distinct_by_hand():
    assert expected_distinct(["a", "b"], 2) == pytest.approx(1.5)  # aa, ab, ba, bb
    assert expected_distinct(["a", "a", "a", "b"], 1) == pytest.approx(1.0)
    assert expected_distinct(["a", "a", "a", "b"], 2) == pytest.approx(1 + 1 - (3 / 4) ** 2 - (1 / 4) ** 2)
    assert expected_distinct([], 4) == 0.0


def test_diversity_ratio_tells_sorted_from_mixed_whatever_the_captions():
    templated = [f"t{t} c{c}" for c in range(10) for t in range(3)]  # 10 classes x 3 templates
    sorted_batches = [[f"t{i % 3} c{c}" for i in range(30)] for c in range(10)]  # one class each
    mixed_batches = [[templated[(7 * i + j) % 30] for i in range(30)] for j in range(10)]
    assert diversity_ratio(sorted_batches, templated) < 0.2
    assert diversity_ratio(mixed_batches, templated) > 0.9
    unique = [[f"caption {b} {i}" for i in range(16)] for b in range(4)]
    assert diversity_ratio(unique, [c for b in unique for c in b]) > 0.9  # unique captions are never degenerate
    one_template = [[f"c{(i + b) % 10}" for i in range(30)] for b in range(4)]
    assert diversity_ratio(one_template, [f"c{c}" for c in range(10)]) > 0.9  # few captions, well mixed
    assert diversity_ratio([], templated) == 1.0 and diversity_ratio(sorted_batches, []) == 1.0


def test_caption_diversity_window_means_and_first_batches():
    d = CaptionDiversity(check_batches=2)
    assert d.take() == {} and not d.ready
    d.add(["a", "a", "b", "c"])
    d.add(["a", "b"])
    d.add(["x", "x"])
    assert d.ready and d.first == [["a", "a", "b", "c"], ["a", "b"]]
    assert d.take() == {"repeated_captions": pytest.approx((0.5 + 0.0 + 1.0) / 3)}
    assert d.take() == {}
    d.expected = 2.0
    d.add(["a", "b"])
    d.add(["a", "a"])
    assert d.take() == {"repeated_captions": 0.5, "caption_diversity": pytest.approx(1.5 / 2.0)}
