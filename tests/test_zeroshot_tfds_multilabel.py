"""The rest of CLIP_benchmark's classification list: VTAB's TFDS-only tasks, ImageNet-O, VOC2007 multi-label (mAP)."""

import pytest
import torch
from helpers import (
    PRIMARIES,
    ColourClip,
    write_folder_tree,
    write_voc,
    write_wds,
    write_wds_multilabel,
)
from PIL import Image
from sklearn.metrics import average_precision_score
from torchvision.transforms import functional as TF

import zeroshot
from vlpretrain.errors import DataError
from zeroshot.datasets import get_benchmark, list_benchmarks
from zeroshot.results import Results, clip_benchmark_results

VTAB = {"dmlab": ("dmlab", 6), "dsprites-orientation": ("dsprites_label_orientation", 40),
        "dsprites-x-position": ("dsprites_label_x_position", 32),
        "dsprites-y-position": ("dsprites_label_y_position", 32),
        "smallnorb-azimuth": ("smallnorb_label_azimuth", 18), "smallnorb-elevation": ("smallnorb_label_elevation", 9),
        "diabetic-retinopathy": ("diabetic_retinopathy", 5)}


def labels_of(evalset) -> list[int]:
    return [evalset.dataset[i][1] for i in range(len(evalset))]


def test_registry_counts_the_whole_suite():
    assert len(list_benchmarks()) >= 41 and len(list_benchmarks(["retrieval"])) >= 3
    counts = {name: len(get_benchmark(name).classnames) for name in VTAB}
    assert counts == {name: n for name, (_, n) in VTAB.items()}
    assert len(get_benchmark("imagenet-o").classnames) == 200 == len(set(get_benchmark("imagenet-o").folders))
    assert set(get_benchmark("imagenet-o").folders) < set(get_benchmark("imagenet1k").folders)
    voc = get_benchmark("voc2007-multilabel")
    assert (voc.task, voc.metric, voc.classnames) == ("multilabel", "mean_average_precision",
                                                     get_benchmark("voc2007").classnames)
    # CLIP_benchmark's templates: its own key where it has one, ImageNet's 80 where it falls back to them
    assert get_benchmark("dsprites-orientation").templates[0] == "an object rotated at {c}"
    assert get_benchmark("dsprites-y-position").templates == get_benchmark("imagenet1k").templates
    assert get_benchmark("dsprites_label_x_position").name == "dsprites-x-position"


@pytest.mark.parametrize("name", sorted(VTAB))
def test_vtab_tasks_from_clip_benchmarks_webdataset_export(tmp_path, name):
    alias, n = VTAB[name]
    labels = [0, n - 1, 1, n // 2]
    # CLIP_benchmark's exports are named wds_vtab-<dataset>; the class names come from its classnames.txt
    write_wds(tmp_path / f"wds_vtab-{alias}", get_benchmark(name).classnames, labels, shards=2, ext="png")
    data = get_benchmark(name).load(tmp_path)
    assert data.format == "wds" and labels_of(data) == labels and data.classnames == get_benchmark(name).classnames
    assert data.dataset[0][0].size == (24, 24)


def test_vtab_task_from_class_folders_named_by_label(tmp_path):
    write_folder_tree(tmp_path / "dmlab" / "test", ["0", "3", "5"], per_class=2, ext=".png")
    data = get_benchmark("dmlab").load(tmp_path)
    assert data.format == "imagefolder" and labels_of(data) == [0, 0, 3, 3, 5, 5]
    write_folder_tree(tmp_path / "bad" / "test", ["0", "6"], per_class=1, ext=".png")
    with pytest.raises(DataError, match="folder '6' is not a dmlab class folder"):
        get_benchmark("dmlab").load(tmp_path / "bad")


def test_imagenet_o_from_wnid_folders(tmp_path):
    folders = get_benchmark("imagenet-o").folders
    write_folder_tree(tmp_path / "imagenet-o", [folders[199], folders[0]], per_class=1)
    assert sorted(labels_of(get_benchmark("imagenet-o").load(tmp_path))) == [0, 199]


def test_voc2007_multilabel_from_the_devkit_and_from_webdataset(tmp_path):
    write_voc(tmp_path, {"000001": [("dog", (1, 1, 20, 20)), ("person", (5, 5, 30, 30)), ("dog", (2, 2, 9, 9))],
                         "000002": [("car", (0, 0, 10, 10))]})
    data = get_benchmark("voc2007-multilabel").load(tmp_path)
    classes = get_benchmark("voc2007").classnames
    assert len(data) == 2 and labels_of(data) == [0, 1]  # whole images, indexed; the targets live beside
    assert data.targets.shape == (2, 20) and data.targets.sum().item() == 3
    assert {classes[c] for c in data.targets[0].nonzero().flatten()} == {"dog", "person"}
    assert data.dataset[0][0].size == (64, 64)  # not cropped
    write_wds_multilabel(tmp_path / "wds_voc2007_multilabel", classes, [[1] + [0] * 19, [0, 1] * 10])
    wds = get_benchmark("voc2007-multilabel").load(tmp_path / "wds_voc2007_multilabel")
    assert wds.format == "wds" and wds.targets.tolist() == [[1] + [0] * 19, [0, 1] * 10]
    write_wds_multilabel(tmp_path / "short", classes, [[1, 0, 0]])
    with pytest.raises(DataError, match="a .npy label has 3 entries, .*classnames.txt 20 classes"):
        get_benchmark("voc2007-multilabel").load(tmp_path / "short")


COLOURS = PRIMARIES


def test_multilabel_zero_shot_scores_mean_average_precision(tmp_path):
    # images of two colour halves: the score of a class is the cosine of the mean colour with its axis
    halves = [("red", "green"), ("red", "red"), ("green", "blue"), ("blue", "blue"), ("red", "blue")]
    images, targets = [], []
    for a, b in halves:
        im = Image.new("RGB", (8, 8), COLOURS[a])
        im.paste(Image.new("RGB", (4, 8), COLOURS[b]), (4, 0))
        images.append(im)
        targets.append([int(c in (a, b)) for c in COLOURS])
    targets[0][2] = 1  # a wrong label, so that AP is not trivially 1
    write_wds_multilabel(tmp_path, list(COLOURS), targets, images=images)
    m = zeroshot.evaluate(ColourClip("a photo of a {}."), "voc2007-multilabel", tmp_path, transform=TF.to_tensor, progress=False,
                          tokenizer=ColourClip("a photo of a {}.").tokenizer)
    feats = torch.stack([TF.to_tensor(im).mean(dim=(1, 2)) for im in images])
    scores = torch.nn.functional.normalize(feats, dim=-1)
    expected = sum(average_precision_score([t[c] for t in targets], scores[:, c]) for c in range(3)) / 3
    assert m["mean_average_precision"] == pytest.approx(expected) and m["headline"] == m["mean_average_precision"]
    assert 0 < m["mean_average_precision_11point"] <= 1 and m["images"] == 5
    doc = clip_benchmark_results(Results("colour", None, zeroshot.evaluate_suite(
        ColourClip("a photo of a {}."), ["voc2007-multilabel"], tmp_path, transform=TF.to_tensor, progress=False,
        tokenizer=ColourClip("a photo of a {}.").tokenizer)))[0][1]
    assert doc["dataset"] == "voc2007_multilabel" and doc["task"] == "zeroshot_classification"
    assert doc["metrics"] == {"mean_average_precision": pytest.approx(expected)}
