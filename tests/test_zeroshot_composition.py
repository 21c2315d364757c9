"""SugarCrepe and Winoground (image-caption selection): files in each benchmark's layout, scores equal to
CLIP_benchmark's formula on a fake model whose similarities the test sets."""

import json
import zipfile

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import zeroshot
from vlpretrain.errors import DataError
from zeroshot.cli import main
from zeroshot.datasets import SelectionSet, get_benchmark
from zeroshot.metrics import caption_selection_metrics


def clip_benchmark_selection(scores: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's metrics/image_caption_selection.py loop, instance by instance, on given scores [N, I, T]."""
    image_score, text_score, score = [], [], []
    for s in scores:
        gt = torch.arange(min(s.shape))
        text_ok = bool((s.argmax(dim=1)[:len(gt)] == gt).all())
        image_ok = bool((s.argmax(dim=0)[:len(gt)] == gt).all())
        image_score.append(image_ok)
        text_score.append(text_ok)
        score.append(text_ok and image_ok)
    return {"image_acc": torch.tensor(image_score).float().mean().item(),
            "text_acc": torch.tensor(text_score).float().mean().item(), "acc": torch.tensor(score).float().mean().item()}


@pytest.mark.parametrize("shape", [(50, 1, 2), (50, 2, 2), (30, 3, 5), (30, 4, 2)])
def test_metrics_equal_clip_benchmarks_loop(shape):
    torch.manual_seed(sum(shape))
    scores = torch.randint(0, 3, shape).float()  # few values: many ties, which both break towards index 0
    got = caption_selection_metrics(scores)
    want = clip_benchmark_selection(scores)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-7)
    assert got["headline"] == got["acc"] and got["instances"] == shape[0] and got["images"] == shape[0] * shape[1]


def test_winoground_scores_by_hand():
    # rows: images 0, 1; columns: captions 0, 1
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8]],    # all right: text, image, group
                           [[0.9, 0.6], [0.1, 0.5]],    # each image its caption (text ok); caption 1 -> image 0 (image not)
                           [[0.5, 0.6], [0.2, 0.8]],    # image 0 prefers caption 1 (text wrong); image ok
                           [[0.5, 0.5], [0.5, 0.5]]])   # all tied: image 0 / caption 0 win by index, 1 loses
    m = caption_selection_metrics(scores)
    assert (m["text_acc"], m["image_acc"], m["acc"]) == (0.5, 0.5, 0.25)


# A fake model: an image embeds as its mean RGB; a caption as the vector the test gave it.
class TableClip(torch.nn.Module):
    def __init__(self, vectors: dict[str, tuple[float, float, float]]):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))
        self.texts = list(vectors)
        self.table = torch.tensor([vectors[t] for t in self.texts], dtype=torch.float32)

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]

    def tokenizer(self, texts):
        return torch.tensor([[self.texts.index(t)] for t in texts])


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_sugar_crepe(root, subset: str, rows: list[tuple[tuple[int, int, int], str, str]]):
    """RAIVNLab/sugar-crepe's <subset>.json (non-contiguous ids, as its files have) with COCO-named images."""
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    doc = {}
    for i, (colour, caption, negative) in enumerate(rows):
        name = f"{397133 + i:012d}.jpg"
        solid(colour).save(root / "val2017" / name, quality=100)
        doc[str(3 * i + 1)] = {"filename": name, "caption": caption, "negative_caption": negative}
    (root / f"{subset}.json").write_text(json.dumps(doc))
    return root


def test_sugar_crepe_end_to_end_by_hand(tmp_path):
    rows = [(RED, "a red cup", "a cup red"),          # right caption nearer: counted
            (GREEN, "a green box", "a box green"),    # the negative is nearer: missed
            (BLUE, "a blue car", "a car blue")]       # equal scores: counted (argmax takes the first, the caption)
    model = TableClip({"a red cup": (1, 0, 0), "a cup red": (0, 1, 0), "a green box": (1, 0, 0),
                       "a box green": (0, 1, 0), "a blue car": (0, 0, 1), "a car blue": (0, 0, 1)})
    write_sugar_crepe(tmp_path / "sugar_crepe", "swap_obj", rows)
    data = get_benchmark("sugar_crepe/swap_obj").load(tmp_path, transform=TF.to_tensor)  # found in sugar_crepe/
    assert isinstance(data, SelectionSet) and len(data) == 3 and data.captions[:2] == ["a red cup", "a cup red"]
    m = zeroshot.evaluate(model, "sugar-crepe-swap-obj", tmp_path, tokenizer=model.tokenizer, transform=TF.to_tensor,
                          progress=False)
    assert (m["acc"], m["text_acc"], m["image_acc"], m["instances"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3),
                                                                        1.0, 3)
    sub = zeroshot.evaluate(model, "sugar-crepe-swap-obj", tmp_path, tokenizer=model.tokenizer,
                            transform=TF.to_tensor, progress=False, max_images=2)  # instances 0 and 2
    assert (sub["instances"], sub["acc"]) == (2, 1.0)


def write_winoground(root, examples: list[tuple[tuple, tuple, str, str]], zipped: bool):
    """facebook/winoground's files: data/examples.jsonl and data/images.zip (or data/images/)."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    lines = []
    for i, (c0, c1, cap0, cap1) in enumerate(examples):
        for j, colour in enumerate((c0, c1)):
            solid(colour).save(data / "images" / f"ex_{i}_img_{j}.png")
        lines.append(json.dumps({"id": i, "caption_0": cap0, "caption_1": cap1, "tag": "Object",
                                 "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": "Object",
                                 "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1"}))
    (data / "examples.jsonl").write_text("\n".join(lines) + "\n")
    if zipped:
        with zipfile.ZipFile(data / "images.zip", "w") as z:
            for p in sorted((data / "images").iterdir()):
                z.write(p, f"images/{p.name}")
                p.unlink()
        (data / "images").rmdir()
    return root


@pytest.mark.parametrize("zipped", [False, True])
def test_winoground_end_to_end_by_hand(tmp_path, zipped):
    examples = [(RED, GREEN, "red over green", "green over red"),   # all right
                (RED, BLUE, "red near blue", "blue near red"),      # text right, image wrong (see vectors)
                (GREEN, BLUE, "green by blue", "blue by green")]    # nothing right
    vectors = {"red over green": (1, 0, 0), "green over red": (0, 1, 0),
               "red near blue": (1, 0, 0.5), "blue near red": (1, 0, 0.9),  # caption 1 is nearer the red image
               "green by blue": (0, 0, 1), "blue by green": (0, 1, 0)}
    model = TableClip(vectors)
    write_winoground(tmp_path / "winoground", examples, zipped)
    m = zeroshot.evaluate(model, "winoground", tmp_path, tokenizer=model.tokenizer, transform=TF.to_tensor,
                          progress=False)
    # the same cosine similarities by hand, through CLIP_benchmark's loop
    unit = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0) for k, v in vectors.items()}
    rgb = {RED: torch.tensor([1., 0, 0]), GREEN: torch.tensor([0, 1., 0]), BLUE: torch.tensor([0, 0, 1.])}
    scores = torch.stack([torch.stack([torch.stack([rgb[im] @ unit[c] for c in (c0, c1)]) for im in (i0, i1)])
                          for i0, i1, c0, c1 in examples])
    want = clip_benchmark_selection(scores)
    assert {k: m[k] for k in want} == pytest.approx(want)
    assert (m["text_acc"], m["image_acc"], m["acc"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3))
    assert m["images"] == 6


def test_selection_files_that_are_wrong_are_named(tmp_path):
    root = write_sugar_crepe(tmp_path, "add_att", [(RED, "a", "b")])
    (root / "val2017" / "000000397133.jpg").unlink()
    with pytest.raises(DataError, match=r"add_att.json: 1 of its images are missing .*000000397133.jpg"):
        get_benchmark("sugar-crepe-add-att").load(root)
    (root / "add_att.json").write_text('{"1": {"filename": "x.jpg"}}')
    with pytest.raises(DataError, match=r"add_att.json: not SugarCrepe's"):
        get_benchmark("sugar-crepe-add-att").load(root)
    with pytest.raises(DataError, match=r"no sugar-crepe-add-obj test data found; expected \[sugar_crepe\] add_obj"):
        get_benchmark("sugar-crepe-add-obj").load(root)
    wino = tmp_path / "wino"
    (wino / "images").mkdir(parents=True)
    (wino / "examples.jsonl").write_text('{"caption_0": "a", "caption_1": "b", "image_0": "ex_0_img_0", '
                                         '"image_1": "ex_0_img_1"}\n')
    with pytest.raises(DataError, match=r"2 Winoground images are missing, e.g. ex_0_img_0.png"):
        get_benchmark("winoground").load(wino)


def test_cli_eval_sugar_crepe_and_winoground_on_a_tiny_model(tmp_path, capsys):
    write_sugar_crepe(tmp_path / "sugar_crepe", "replace_rel", [(RED, "a cat on a mat", "a mat on a cat"),
                                                               (BLUE, "a dog in a car", "a car in a dog")])
    write_winoground(tmp_path / "winoground", [(RED, GREEN, "red then green", "green then red")], zipped=True)
    out = tmp_path / "results.json"
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "sugar_crepe/replace_rel,winoground", "--root",
                 str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sugar-crepe-replace-rel: acc=" in printed and "winoground: acc=" in printed and "text_acc=" in printed
    got = {r["benchmark"]: r for r in json.loads(out.read_text())["results"]}
    assert {b: (r["task"], r["metric"], r["format"]) for b, r in got.items()} == {
        "sugar-crepe-replace-rel": ("image_caption_selection", "acc", "sugar_crepe"),
        "winoground": ("image_caption_selection", "acc", "winoground")}
    for r in got.values():
        m = r["metrics"]
        assert m["acc"] <= min(m["text_acc"], m["image_acc"]) and m["acc"] in (0, 0.5, 1)
    assert got["sugar-crepe-replace-rel"]["metrics"]["image_acc"] == 1.0  # one image: always its own
    assert main(["export-results", str(out), "--out", str(tmp_path / "cb")]) == 0
    docs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "cb").iterdir()}
    doc = docs["sugar_crepe_replace_rel_none_tiny-vit_en_image_caption_selection.json"]
    assert doc["dataset"] == "sugar_crepe/replace_rel" and set(doc["metrics"]) == {"acc", "text_acc", "image_acc"}
