"""`evaluate` end to end with a model whose predictions are known: exact metrics on a webdataset directory."""

import io
import tarfile

import pytest
from helpers import PRIMARIES, ColourClip
from PIL import Image
from torchvision.transforms import functional as TF

import zeroshot
from zeroshot.evaluate import spread_subset

COLOURS = PRIMARIES
tokenizer = ColourClip().tokenizer


@pytest.fixture
def colour_wds(tmp_path):
    """6 solid images: red, red, green, blue, blue, blue, labelled 0, 0, 1, 1, 2, 2 (image 3 is mislabelled)."""
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c} thing.\n")
    (tmp_path / "test").mkdir()
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as tar:
        for i, (colour, label) in enumerate(zip(["red", "red", "green", "blue", "blue", "blue"], [0, 0, 1, 1, 2, 2])):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), COLOURS[colour]).save(buf, format="PNG")
            for name, data in ((f"{i}.png", buf.getvalue()), (f"{i}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_evaluate_exact_metrics(colour_wds):
    model = ColourClip().train()
    m = zeroshot.evaluate(model, "stl10", colour_wds, tokenizer=tokenizer, transform=TF.to_tensor, batch_size=4,
                          progress=False)
    # predictions 0, 0, 1, 2, 2, 2: 5 of 6 right; recall red 1, green 1/2, blue 1
    assert m == pytest.approx({"top1": 5 / 6, "mean_per_class_recall": 2.5 / 3, "headline": 5 / 6, "images": 6.0})
    assert model.training


def test_max_images_takes_an_evenly_spaced_subset(colour_wds):
    m = zeroshot.evaluate(ColourClip(), "stl10", colour_wds, tokenizer=tokenizer, transform=TF.to_tensor,
                          max_images=3, progress=False)
    # items 0, 2 and 5 (linspace 0..5, rounded): red/0, green/1, blue/2, all right
    assert m["images"] == 3 and m["top1"] == 1.0
    assert spread_subset(list(range(10)), 4).indices == [0, 3, 6, 9]


def test_evaluate_suite_entries(colour_wds, tmp_path):
    seen = []
    entries = zeroshot.evaluate_suite(ColourClip(), ["stl10"], colour_wds, tokenizer=tokenizer,
                                      transform=TF.to_tensor, progress=False, on_result=seen.append)
    assert seen == entries and entries[0].task == "zeroshot" and entries[0].benchmark == "stl10"
    assert entries[0].format == "wds" and entries[0].headline == pytest.approx(5 / 6)
    path = tmp_path / "out" / "results.json"
    zeroshot.update_results(path, "colour-clip", None, entries)
    assert zeroshot.read_results(path).get("zeroshot", "stl10").metrics["images"] == 6.0
