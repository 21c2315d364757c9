"""Your own class names and templates (--classnames / --templates, CuPL prompts) and any recall@k (--recall-k):
exact heads and scores on a fake model whose text features follow the words, bad files failing in one line."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from helpers import write_wds
from PIL import Image

import zeroshot
from vlpretrain.errors import ConfigError, DataError
from zeroshot.classifier import build_classifier
from zeroshot.cli import main
from zeroshot.datasets import get_benchmark
from zeroshot.prompts import read_prompts

AXES = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class WordClip(torch.nn.Module):
    """Images embed as (mean R, G, B, 0); a text as the sum of the colour axes its words name plus 0.01 on a fourth
    axis no image has (a text naming no colour scores 0 with every image), or as the vector `table` gives it."""

    def __init__(self, table: dict[str, tuple[float, float, float]] | None = None):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))
        self.table, self.seen = table or {}, []

    def vector(self, text: str) -> torch.Tensor:
        if text in self.table:
            return torch.tensor([*self.table[text], 0.0])
        v = torch.tensor([0.0, 0.0, 0.0, 0.01])
        for word in re.findall(r"[a-z]+", text):
            v[:3] += torch.tensor(AXES.get(word, (0.0, 0.0, 0.0)))
        return v

    def encode_image(self, images):
        rgb = images.mean(dim=(2, 3))
        return torch.cat([rgb, torch.zeros(len(rgb), 1)], dim=1)

    def encode_text(self, tokens):
        return torch.stack([self.vector(self.seen[i]) for i in tokens[:, 0].tolist()])

    def tokenizer(self, texts):
        self.seen += list(texts)
        return torch.tensor([[len(self.seen) - len(texts) + i] for i in range(len(texts))])


DIGITS = [str(i) for i in range(10)]


@pytest.fixture
def mnist(tmp_path):
    """CLIP_benchmark's webdataset layout of `mnist` (10 classes); images of labels 0, 1, 2 are drawn crimson,
    dodger blue and lime (helpers.COLOURS), so a head naming red, blue, green gets all of them."""
    return write_wds(tmp_path / "mnist", DIGITS, [0, 1, 2] * 3, shards=1, ext="png")


def evaluate(root, **kwargs) -> dict:
    model = WordClip()
    return zeroshot.evaluate(model, "mnist", root, tokenizer=model.tokenizer, transform=TF.to_tensor,
                             progress=False, **kwargs)


def test_classnames_and_templates_files_change_the_head(mnist, tmp_path):
    right = tmp_path / "names.json"
    right.write_text(json.dumps({"mnist": ["red", "blue", "green", *DIGITS[3:]]}))
    assert evaluate(mnist, classnames=right)["top1"] == 1.0
    swapped = tmp_path / "swapped.txt"  # plain text, one name a line, for one benchmark
    swapped.write_text("\n".join(["blue", "red", "green", *DIGITS[3:]]) + "\n")
    assert evaluate(mnist, classnames=swapped)["top1"] == pytest.approx(1 / 3)  # only label 2 still right
    assert evaluate(mnist)["top1"] != 1.0  # "0", "1", ... name no colour: every head is the fourth axis

    templates = tmp_path / "templates.txt"
    templates.write_text("a green {c}.\n{c}\n")
    bench = get_benchmark("mnist")
    data = read_prompts(["mnist"], right, templates).apply(bench, bench.load(mnist, transform=TF.to_tensor))
    assert data.classnames[:3] == ["red", "blue", "green"] and data.templates == ["a green {c}.", "{c}"]
    model = WordClip()
    head = build_classifier(model, model.tokenizer, data.classnames, data.templates)
    unit = [F.normalize(torch.tensor(v), dim=0) for v in ([1.0, 1, 0, .01], [1.0, 0, 0, .01])]  # "a green red.", "red"
    assert torch.allclose(head[:, 0], F.normalize(unit[0] + unit[1], dim=0))
    # CLIP_benchmark's keyed form, where a benchmark without a key takes the file's imagenet1k entry
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"imagenet1k": ["a red {c}.", "a {c}"]}))
    assert read_prompts(["mnist"], templates=keyed).templates == {"mnist": ["a red {c}.", "a {c}"]}


def test_class_specific_prompts_make_the_exact_head(mnist, tmp_path):
    prompts = {d: [f"digit {d}"] for d in DIGITS}
    prompts["0"] = ["something red", "red and green"]
    prompts["1"] = ["blue"]
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({"mnist": prompts}))
    data = read_prompts(["mnist"], templates=path).apply(get_benchmark("mnist"),
                                                         get_benchmark("mnist").load(mnist, transform=TF.to_tensor))
    assert data.templates["0"] == ["something red", "red and green"]
    model = WordClip()
    head = build_classifier(model, model.tokenizer, data.classnames, data.templates)
    want0 = F.normalize(F.normalize(torch.tensor([1, 0, 0, .01]), dim=0)
                        + F.normalize(torch.tensor([1, 1, 0, .01]), dim=0), dim=0)
    assert torch.allclose(head[:, 0], want0)
    assert torch.allclose(head[:, 1], F.normalize(torch.tensor([0, 0, 1, .01]), dim=0))
    assert torch.allclose(head[:, 5], torch.tensor([0, 0, 0, 1.0]))
    m = evaluate(mnist, templates=path)
    assert m["top1"] == pytest.approx(2 / 3)  # red and blue images found; lime's class 2 has no colour word


def test_cupl_prompts_as_clip_benchmark_ships_them():
    custom = read_prompts(["imagenet1k", "imagenet-r"], templates="cupl")
    cupl = custom.templates["imagenet1k"]
    # 1000 classes, 998 keys: "missile" and "sunglasses" name two ImageNet classes each and share their prompts
    assert len(cupl) == 998 and all(len(v) == 150 for v in cupl.values())
    assert cupl["tench"][0] == "A tench is a freshwater fish of the carp family."
    assert set(get_benchmark("imagenet1k").classnames) == set(cupl)
    assert custom.templates["imagenet-r"] == cupl  # a variant takes the imagenet1k entry, as in CLIP_benchmark
    with pytest.raises(ConfigError, match=r"--templates cupl: has no entry for cifar10 \(its keys: imagenet1k\)"):
        read_prompts(["cifar10"], templates="cupl")


@pytest.mark.parametrize("content, bench, message", [
    ('{"mnist": ["a", "b"]}', "mnist", "{path}: 2 class names for mnist, which has 10 classes"),
    ('{"mnsit": ["a"]}', "mnist", "{path}: unknown benchmark 'mnsit' (see `zeroshot list`)"),
    ("0\n1\n", "mnist,cifar10", "{path}: a plain list is for one benchmark, not 2 (give JSON keyed by benchmark name)"),
    ('{"flickr30k": ["a"]}', "flickr30k", "{path}: flickr30k is a retrieval benchmark; it has no class names"),
])
def test_bad_classnames_files_fail_in_one_line(tmp_path, capsys, content, bench, message):
    path = tmp_path / ("names.json" if content.startswith("{") else "names.txt")
    path.write_text(content)
    assert main(["eval", "--model", "tiny-vit", "--benchmark", bench, "--root", str(tmp_path),
                 "--classnames", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message.format(path='--classnames ' + str(path))}") and "\n" not in err


@pytest.mark.parametrize("content, message", [
    ("a photo of a thing.\n", "{path}: template 'a photo of a thing.' for mnist has no {{c}} for the class name"),
    ('{"mnist": {"0": ["zero"]}}', "{path}: no class-specific prompts for mnist's class '1'"),
])
def test_bad_templates_files_fail_in_one_line(mnist, tmp_path, capsys, content, message):
    path = tmp_path / ("t.json" if content.startswith("{") else "t.txt")
    path.write_text(content)
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "mnist", "--root", str(mnist),
                 "--templates", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message.format(path='--templates ' + str(path))}"


def test_class_names_not_matching_the_files_on_disk_are_named(tmp_path):
    root = write_wds(tmp_path / "mnist", DIGITS[:5], [0, 1], shards=1, ext="png")  # its classnames.txt: 5 classes
    with pytest.raises(DataError, match=r"mnist has 5 classes there, 10 class names given"):
        evaluate(root, classnames=DIGITS)


# recall@k for any k, on three images whose features are one-hot colours and captions whose vectors are set.
def write_flickr_solid(root, captions: list[str]):
    root.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (4, 4), colour).save(root / f"{i}.png")
    lines = ["image,caption"] + [f"{i}.png,{c}" for i, c in enumerate(captions)]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def test_recall_at_any_k_by_hand(tmp_path):
    table = {"t0": (1, 0, 0), "t1": (0, 0.5, 0.9), "t2": (1, 0, 0)}
    model = WordClip(table)
    root = write_flickr_solid(tmp_path / "flickr30k", list(table))
    m = zeroshot.evaluate(model, "flickr30k", root, tokenizer=model.tokenizer, transform=TF.to_tensor,
                          progress=False, recall_ks=[3, 1, 2])
    # text -> image ranks 1, 2 (image 2 scores .87 above image 1's .49), 3 (a tie at 0 counts against);
    # image -> text ranks 2 (t2 ties t0 at 1), 1, 3
    want = {f"{d}_retrieval_recall@{k}": v for d in ("image", "text") for k, v in ((1, 1 / 3), (2, 2 / 3), (3, 1))}
    assert {k: v for k, v in m.items() if "_retrieval_recall@" in k} == pytest.approx(want)
    assert m["mean_recall"] == pytest.approx(2 / 3)
    # flickr30k's headline is DataComp's mean of the two recall@1
    assert m["mean_recall@1"] == m["headline"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="recall_k: expected whole numbers of at least 1, got 0 5"):
        zeroshot.evaluate(model, "flickr30k", root, recall_ks=[0, 5])


def test_cli_recall_k_and_classnames_end_to_end(mnist, tmp_path, capsys):
    root = tmp_path / "collection"
    write_flickr_solid(root / "flickr30k", ["a red square", "a green square", "a blue square"])
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"mnist": ["red", "blue", "green", *DIGITS[3:]]}))
    out = tmp_path / "results.json"
    (root / "mnist").symlink_to(mnist, target_is_directory=True)
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "flickr30k,mnist", "--root", str(root),
                 "--recall-k", "1", "2", "50", "--classnames", str(names), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"mnist: class names from --classnames {names}" in printed
    got = {r["benchmark"]: r["metrics"] for r in json.loads(out.read_text())["results"]}
    recalls = {k: v for k, v in got["flickr30k"].items() if "_retrieval_recall@" in k}
    assert set(recalls) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 50)}
    assert recalls["image_retrieval_recall@50"] == 1 and got["flickr30k"]["mean_recall"] == pytest.approx(
        sum(recalls.values()) / 6)
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "flickr30k", "--root", str(root),
                 "--recall-k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: recall_k: expected whole numbers of at least 1, got 0"


def test_adapt_fits_with_your_class_names_and_its_adapter_needs_them_again(tmp_path):
    from vlpretrain.errors import CheckpointError
    from vlpretrain.models import build_model, image_transform
    from zeroshot.evaluate import run_zeroshot
    from zeroshot.fewshot import AdaptConfig, adapt, adapt_head

    torch.manual_seed(0)
    model = build_model("tiny-vit").eval()
    root = tmp_path / "mnist"
    write_wds(root, DIGITS, [i % 10 for i in range(20)], shards=1, ext="png", split="train")
    write_wds(root, DIGITS, [i % 10 for i in range(10)], shards=1, ext="png", split="test")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    result = adapt(model, "mnist", root, shots=1, method="ia3", config=AdaptConfig(steps=0), cache_dir=tmp_path,
                   classnames=names)
    bench = get_benchmark("mnist")
    data = read_prompts(["mnist"], names).apply(bench, bench.load(root, transform=image_transform(model, train=False)))
    assert result.metrics["top1"] == run_zeroshot(model, data)["top1"]  # zero steps: the head of your class names
    torch.testing.assert_close(adapt_head(model, result.adapter, classnames=names),
                               build_classifier(model, None, names, bench.templates), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointError, match="adapter was fitted on other prompts for mnist"):
        adapt_head(model, result.adapter)  # the benchmark's own names are other prompts
    with pytest.raises(ConfigError, match="class-specific prompts have no templates shared by every class"):
        adapt(model, "mnist", root, shots=1, method="ia3", templates={"mnist": {d: ["x"] for d in DIGITS}})
