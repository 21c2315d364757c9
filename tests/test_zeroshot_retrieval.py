"""Retrieval benchmarks: every caption layout from fake files, exact recall with a known model, the CLI end to end,
and CLIP_benchmark's result files."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from helpers import (
    PRIMARIES,
    ColourClip,
    drawn_image,
    write_cifar,
    write_coco_captions,
    write_coco_karpathy,
    write_flickr,
    write_wds_captions,
)
from PIL import Image
from torchvision.transforms import functional as TF

import zeroshot
from vlpretrain.config import ModelConfig
from vlpretrain.data import write_shards
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.models import build_model, export_model
from zeroshot.cli import main
from zeroshot.datasets import CaptionSet, get_benchmark, list_benchmarks
from zeroshot.results import CLIP_BENCHMARK_KEYS

# three images with 2, 1 and 3 captions (one holds commas, as Flickr's do)
CAPTIONS = [["a dog, running.", "a brown dog"], ["a cat"], ["two birds", "birds on a wire, at dusk", "a sky"]]
FLAT = [c for caps in CAPTIONS for c in caps]
OWNERS = [0, 0, 1, 2, 2, 2]


def check(data: CaptionSet, fmt: str, lossless: bool = False) -> None:
    """One image per image (not per caption), every caption with its image's index, images in file order."""
    assert isinstance(data, CaptionSet) and data.format == fmt
    assert len(data) == 3 and data.captions == FLAT and data.text_to_image == OWNERS
    for i in range(3):
        image, index = data.images[i]
        assert index == i and image.size == (24, 24)
        if lossless:
            assert np.array_equal(np.asarray(image), np.asarray(drawn_image(i, 24, i)))


def test_registry_knows_the_retrieval_sets_and_their_task():
    retrieval = [b.name for b in list_benchmarks(["retrieval"])]
    assert retrieval == ["flickr8k", "flickr30k", "mscoco", "captions", "crossmodal3600", "xtd10", "multilingual-mscoco"]
    assert {b.task for b in list_benchmarks(None)} == {"classification", "multilabel", "retrieval", "association",
                                                       "caption_selection"}
    assert all(b.task != "retrieval" for b in list_benchmarks())
    assert get_benchmark("mscoco_captions").name == "mscoco" and get_benchmark("flickr30k").metric == "mean_recall@1"
    assert get_benchmark("flickr30k").formats == ("karpathy", "wds", "shards", "coco")
    assert get_benchmark("flickr30k").classnames == [] and "flickr30k_test_karpathy" in get_benchmark(
        "flickr30k").sources["annotations"]


@pytest.mark.parametrize("prefix, image_dir", [("flickr30k", ""), ("flickr8k", "Images")])
def test_flickr_karpathy_txt(tmp_path, prefix, image_dir):
    write_flickr(tmp_path / prefix, prefix, CAPTIONS, image_dir=image_dir)
    check(get_benchmark(prefix).load(tmp_path), "karpathy")  # found as a sub-folder of a collection root


def test_flickr_missing_image_is_named(tmp_path):
    write_flickr(tmp_path, "flickr30k", CAPTIONS)
    (tmp_path / "1001.jpg").unlink()
    with pytest.raises(DataError, match=r"1 images are missing from .*, e.g. 1001.jpg"):
        get_benchmark("flickr30k").load(tmp_path)


def test_mscoco_karpathy_json(tmp_path):
    write_coco_karpathy(tmp_path, CAPTIONS)
    check(get_benchmark("mscoco").load(tmp_path), "karpathy")


def test_coco_captions_json_as_make_shards_reads_it(tmp_path):
    write_coco_captions(tmp_path, CAPTIONS, name="val2017")
    write_coco_captions(tmp_path, [["unused"]] * 2, name="train2017")  # the test split takes val, not train
    check(get_benchmark("captions").load(tmp_path), "coco")
    assert len(get_benchmark("captions").load(tmp_path, split="train")) == 2


def test_clip_benchmark_webdataset_retrieval_export(tmp_path):
    write_wds_captions(tmp_path / "wds_flickr30k", CAPTIONS, shards=2)
    check(get_benchmark("flickr30k").load(tmp_path), "wds", lossless=True)
    (tmp_path / "wds_flickr30k" / "dataset_type.txt").write_text("classification\n")
    with pytest.raises(DataError, match="says 'classification'; flickr30k needs a retrieval export"):
        get_benchmark("flickr30k").load(tmp_path / "wds_flickr30k")


def test_our_own_shards_keep_every_caption(tmp_path):
    write_coco_captions(tmp_path / "src", CAPTIONS)
    manifest = write_shards(tmp_path / "src" / "annotations" / "captions_val2017.json", tmp_path / "shards",
                            shard_size=2, keep_order=True, progress=False)  # file order, as check() expects
    assert len(manifest["shards"]) == 2  # the images span shards
    data = get_benchmark("captions").load(tmp_path / "shards")
    check(data, "shards")
    assert get_benchmark("mscoco").load(tmp_path / "shards", format="shards").captions == FLAT


def test_an_image_without_captions_is_left_out(tmp_path):
    write_wds_captions(tmp_path, [["one"], [], ["two", "three"]], shards=1)
    data = get_benchmark("captions").load(tmp_path)
    assert len(data) == 2 and data.text_to_image == [0, 1, 1] and data.images[1][1] == 1


COLOURS = PRIMARIES
colour_tokens = ColourClip().tokenizer


def test_retrieval_end_to_end_gives_the_exact_recalls(tmp_path):
    # red image: "a red thing." and a wrong "a blue thing."; green: "a green thing."; blue: "a blue thing."
    (tmp_path / "test").mkdir()
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as tar:
        for i, (colour, caps) in enumerate([("red", ["red", "blue"]), ("green", ["green"]), ("blue", ["blue"])]):
            for ext, data in (("png", None), ("txt", "\n".join(f"a {c} thing." for c in caps).encode())):
                if data is None:
                    buf = io.BytesIO()
                    Image.new("RGB", (4, 4), COLOURS[colour]).save(buf, format="PNG")
                    data = buf.getvalue()
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    m = zeroshot.retrieval(ColourClip(), "captions", tmp_path, tokenizer=colour_tokens, transform=TF.to_tensor,
                           progress=False, ks=(1, 2, 3))
    # text -> image ranks: red 1, the wrong blue caption 3 (blue wins, green ties its red image), green 1, blue 1
    assert m["image_retrieval_recall@1"] == 0.75 and m["image_retrieval_recall@2"] == 0.75
    assert m["image_retrieval_recall@3"] == 1 and m["image_retrieval_mean_rank"] == 1.5
    # image -> text ranks: red 1, green 1, blue 2 (its caption ties the red image's wrong blue caption)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3) and m["text_retrieval_recall@2"] == 1
    assert (m["images"], m["texts"]) == (3, 4)
    # a subset of images keeps only their captions: images 0 and 2 (evenly spaced), 3 captions
    sub = zeroshot.retrieval(ColourClip(), "captions", tmp_path, tokenizer=colour_tokens, transform=TF.to_tensor,
                             progress=False, max_images=2, ks=(1,))
    assert (sub["images"], sub["texts"]) == (2, 3)
    with pytest.raises(ConfigError, match="cifar10 is a classification benchmark, not a retrieval one"):
        zeroshot.retrieval(ColourClip(), "cifar10", tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return export_model(build_model("tiny-vit"), ModelConfig(name="tiny-vit"), path)


def test_cli_eval_picks_the_task_per_benchmark_and_reports_both(exported, tmp_path, capsys):
    root = tmp_path / "benchmarks"
    write_flickr(root / "flickr30k", "flickr30k", CAPTIONS)
    write_wds_captions(root / "mscoco", CAPTIONS * 2, shards=2)
    write_cifar(root / "cifar10" / "cifar-10-batches-py", [i % 10 for i in range(12)], "test_batch")
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(exported), "--benchmark", "flickr30k,mscoco,cifar10", "--root", str(root),
                 "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "flickr30k: mean_recall@1=" in printed and "(karpathy at" in printed and "cifar10: top1=" in printed
    got = {r["benchmark"]: r for r in json.loads(out.read_text())["results"]}
    assert {b: (r["task"], r["metric"], r["format"]) for b, r in got.items()} == {
        "flickr30k": ("retrieval", "mean_recall@1", "karpathy"), "mscoco": ("retrieval", "mean_recall@1", "wds"),
        "cifar10": ("zeroshot", "top1", "torchvision")}
    m = got["mscoco"]["metrics"]
    assert (m["images"], m["texts"]) == (6, 12)
    assert set(m) == {f"{d}_retrieval_{s}" for d in ("image", "text")
                      for s in ("recall@1", "recall@5", "recall@10", "mean_rank", "median_rank")} | {
                          "mean_recall", "mean_recall@1", "headline", "images", "texts"}
    # DataComp's headline: the mean of the two recall@1 (eval_utils/retr_eval.py)
    assert m["headline"] == m["mean_recall@1"] == (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
    assert 0 <= m["mean_recall"] <= 1 and m["text_retrieval_recall@10"] == 1  # 6 images: any caption is in a top 10

    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| retrieval | flickr30k | mean_recall@1 |" in md and "| zeroshot | cifar10 | top1 |" in md

    assert main(["export-results", str(out), "--out", str(tmp_path / "cb")]) == 0
    files = sorted(p.name for p in (tmp_path / "cb").iterdir())
    assert files == ["cifar10_none_tiny.safetensors_en_zeroshot_classification.json",
                     "flickr30k_none_tiny.safetensors_en_zeroshot_retrieval.json",
                     "mscoco_captions_none_tiny.safetensors_en_zeroshot_retrieval.json"]


def test_clip_benchmark_files_have_exactly_its_keys(exported, tmp_path):
    root = tmp_path / "benchmarks"
    write_wds_captions(root / "flickr8k", CAPTIONS, shards=1)
    write_cifar(root / "cifar10" / "cifar-10-batches-py", [i % 10 for i in range(8)], "test_batch")
    out = tmp_path / "cb"
    assert main(["eval", "--model", str(exported), "--benchmark", "flickr8k,cifar10", "--root", str(root),
                 "--out", str(out), "--results-format", "clip_benchmark", "--no-progress"]) == 0
    docs = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert len(docs) == 2
    for doc in docs.values():
        assert tuple(doc) == CLIP_BENCHMARK_KEYS
        assert doc["model"] == str(exported) and doc["pretrained"] == "" and doc["language"] == "en"
    retrieval = docs["flickr8k_none_tiny.safetensors_en_zeroshot_retrieval.json"]
    assert retrieval["dataset"] == "flickr8k" and retrieval["task"] == "zeroshot_retrieval"
    assert set(retrieval["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    classification = docs["cifar10_none_tiny.safetensors_en_zeroshot_classification.json"]
    assert set(classification["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert not any(math.isnan(v) for v in classification["metrics"].values())
