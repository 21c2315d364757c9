"""Zero-shot in other languages: per-language prompt files reach the text encoder, a missing language fails in one
line naming those there are, the multilingual retrieval sets read from CLIP_benchmark's layouts with recall equal to
its formula, and the CLI end to end with a tiny model."""

import json

import numpy as np
import pytest
import torch
from helpers import mnist_arrays, write_idx, write_wds
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

import zeroshot
from vlpretrain.config import ModelConfig
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.models import build_model, export_model
from zeroshot.classifier import expand_prompts
from zeroshot.cli import main
from zeroshot.datasets import CaptionSet, get_benchmark, list_benchmarks
from zeroshot.datasets.base import LANGUAGE_ASSETS, load_asset
from zeroshot.results import ResultEntry, Results, clip_benchmark_results

FASHION = {"en": "T-shirt/top", "de": "T-Shirt/Top", "fr": "t-shirt/haut", "zh": "T恤/上衣", "ja": "Tシャツ/トップス"}


# ---- the language files ---------------------------------------------------------------------------------------------

def test_every_language_file_fits_its_english_file():
    files = sorted(LANGUAGE_ASSETS.glob("*/*.json"))
    assert len(files) >= 28  # fashion-mnist in 4 languages, 6 ImageNet sets in 4
    for path in files:
        language, name = path.parent.name, path.stem
        data, english = load_asset(name, language), load_asset(name)
        assert data["name"] == name and set(data["sources"]) >= {"classnames", "templates"}, path
        assert len(data["classnames"]) == len(english["classnames"]), path
        assert all("{c}" in t or "{}" in t for t in data["templates"]), path
        assert data["classnames"] != english["classnames"], path  # really another language
    for language, first in FASHION.items():
        bench = get_benchmark("fashion-mnist", language)
        assert bench.language == language and bench.classnames[0] == first
        assert "own translation" in bench.sources["classnames"] or language == "en"
    # CLIP_benchmark's lists keep their order and subsets: ImageNet-A's first class is the stingray (ILSVRC index 6)
    assert get_benchmark("imagenet-a", "it").classnames[0] == get_benchmark("imagenet1k", "it").classnames[6]
    assert get_benchmark("imagenet1k", "jp").language == "ja"  # CLIP_benchmark's code for Japanese works too
    assert "cn_classnames.json" in get_benchmark("imagenet1k", "zh").sources["classnames"]


def test_a_missing_language_fails_in_one_line_naming_those_there_are():
    with pytest.raises(ConfigError) as e:
        get_benchmark("fashion-mnist", "ko")
    assert str(e.value) == ("language: fashion-mnist has no class names and templates in 'ko'; "
                            "it has en, de, fr, ja, zh")
    with pytest.raises(ConfigError, match=r"^language: cifar10 has no class names and templates in 'de'; it has en$"):
        zeroshot.evaluate(nn.Linear(1, 1), "cifar10", "/nonexistent", language="de")
    with pytest.raises(ConfigError, match=r"^language: flickr30k has no captions in 'de'; it has en$"):
        zeroshot.retrieval(nn.Linear(1, 1), "flickr30k", "/nonexistent", language="de")
    with pytest.raises(ConfigError, match=r"xtd10 has no captions in 'ar'; it has en, de, es, fr, it, ja, ko, pl, ru"):
        get_benchmark("xtd10", "ar")


# ---- the head: the language's prompts reach the text encoder -------------------------------------------------------

class Recorder(nn.Module):
    """A model whose tokenizer records every text it is given; texts and images embed as fixed random vectors."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.texts: list[str] = []
        self.table = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))

    def tokenizer(self, texts):
        self.texts += texts
        return torch.tensor([[len(self.texts) - len(texts) + i] for i in range(len(texts))])

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]

    def encode_image(self, images):
        return images.flatten(1)[:, :8]


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """Fashion-MNIST in torchvision's idx layout: 2 train and 1 test image per class."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "fashion-mnist" / "FashionMNIST" / "raw"
    for prefix, n in (("t10k", 10), ("train", 20)):
        labels = [i % 10 for i in range(n)]
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", mnist_arrays(labels))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8))
    return root


@pytest.mark.parametrize("language", ["de", "ja"])
def test_the_head_is_built_from_the_language_file(fashion_root, language):
    model = Recorder()
    m = zeroshot.evaluate(model, "fashion-mnist", fashion_root, tokenizer=model.tokenizer, transform=TF.to_tensor,
                          progress=False, language=language)
    data = json.loads((LANGUAGE_ASSETS / language / "fashion-mnist.json").read_text(encoding="utf-8"))
    assert model.texts == expand_prompts(data["classnames"], data["templates"])[0]
    assert m["images"] == 10
    english = Recorder()
    zeroshot.evaluate(english, "fashion-mnist", fashion_root, tokenizer=english.tokenizer, transform=TF.to_tensor,
                      progress=False)
    assert english.texts[0] == "a photo of a T-shirt/top." and not set(english.texts) & set(model.texts)


def test_a_webdataset_export_takes_the_language_prompts_not_its_english_files(tmp_path):
    write_wds(tmp_path, ["tee", "trousers"] + [f"c{i}" for i in range(8)], list(range(10)), shards=1, ext="png",
              templates=["an English {c}."])
    model = Recorder()
    zeroshot.evaluate(model, "fashion-mnist", tmp_path, tokenizer=model.tokenizer, transform=TF.to_tensor,
                      progress=False, language="zh")
    zh = get_benchmark("fashion-mnist", "zh")
    assert model.texts == expand_prompts(zh.classnames, zh.templates)[0]
    english = Recorder()
    zeroshot.evaluate(english, "fashion-mnist", tmp_path, tokenizer=english.tokenizer, transform=TF.to_tensor,
                      progress=False)
    assert english.texts[:2] == ["an English tee.", "an English trousers."]  # in English the export's files win


# ---- multilingual retrieval in CLIP_benchmark's layouts -------------------------------------------------------------

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# one caption per image and language; each caption embeds as the vector given (the hand-worked case below)
CAPTIONS = {"de": ["ein rotes Bild", "ein grünes Bild", "ein blaues Auto"],
            "ja": ["赤い絵", "緑の絵", "青い車"],
            "en": ["a red picture", "a green picture", "a blue car"]}
VECTORS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.6, 0.0, 0.4)]
NAMES = ["000000391895.jpg", "000000522418.jpg", "000000184613.jpg"]


class Lookup(nn.Module):
    """Images embed as their mean RGB; each caption of CAPTIONS as its VECTORS entry."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.vocab = [c for caps in CAPTIONS.values() for c in caps]

    def tokenizer(self, texts):
        return torch.tensor([[self.vocab.index(t)] for t in texts])

    def encode_text(self, tokens):
        return torch.tensor([VECTORS[int(t) % 3] for t in tokens[:, 0]])

    def encode_image(self, images):
        return images.mean(dim=(2, 3))


def save_images(folder, names=NAMES):
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in zip(names, RGB.values()):
        Image.new("RGB", (4, 4), colour).save(folder / name, format="PNG")  # lossless whatever the name says


def write_xm3600(root):
    lines = [json.dumps({"image/key": f"k{i}", **{lang: {"caption": [caps[i], "another caption"]}
                                                  for lang, caps in CAPTIONS.items()}}, ensure_ascii=False)
             for i in range(3)]
    (root / "xm3600").mkdir(parents=True)
    (root / "xm3600" / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    save_images(root / "xm3600" / "images", [f"k{i}.jpg" for i in range(3)])


def write_xtd_files(root, folder, repo_layout):
    """XTD10's files: the image list and caption files side by side, or in the repository's folders."""
    base = root / folder
    save_images(base / "images")
    index = base / ("XTD10" if repo_layout else "") / "test_image_names.txt"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(NAMES) + "\n")
    for lang, code, sub in (("de", "de", "MIC"), ("ja", "jp", "STAIR"), ("en", "en", "XTD10")):
        path = base / (sub if repo_layout else "") / f"test_1kcaptions_{code}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(CAPTIONS[lang]) + "\n", encoding="utf-8")


def write_annotations(root, prefix, folder, code, lang):
    """CLIP_benchmark's annotation file as its first run writes it (image paths as it joined them)."""
    save_images(root / folder / "images")
    doc = {"image_paths": [str(root / folder / "images" / n) for n in NAMES], "annotations": CAPTIONS[lang],
           "indicies": [0, 1, 2]}
    (root / f"{prefix}-{code}.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


LAYOUTS = {
    "xm3600": ("crossmodal3600", write_xm3600),
    "xm3600-annotations": ("crossmodal3600",
                           lambda r: write_annotations(r, "crossmodal3600_captions", "xm3600", "ja", "ja")),
    "xtd-flat": ("xtd10", lambda r: write_xtd_files(r, "xtd10", False)),
    "xtd-repo": ("xtd10", lambda r: write_xtd_files(r, "xtd10", True)),
    "xtd-annotations": ("xtd10", lambda r: write_annotations(r, "xtd10", "xtd10", "jp", "ja")),
    "mscoco-files": ("multilingual-mscoco", lambda r: write_xtd_files(r, "multilingual_mscoco", True)),
    "mscoco-annotations": ("multilingual_mscoco_captions",
                           lambda r: write_annotations(r, "multilingual_mscoco_captions", "multilingual_mscoco", "jp",
                                                       "ja")),
}


def clip_benchmark_recall(images, texts, text_to_image, k):
    """CLIP_benchmark's zeroshot_retrieval recall@k (both ways) from its definition: a query is a hit when a top-k
    candidate (torch.topk of the cosine scores) is a positive."""
    scores = nn.functional.normalize(texts, dim=-1) @ nn.functional.normalize(images, dim=-1).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.as_tensor(text_to_image)] = True

    def hits(s, p):
        top = torch.topk(s, k, dim=1).indices
        return p.gather(1, top).any(1).float().mean().item()

    return hits(scores, positive), hits(scores.T, positive.T)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multilingual_retrieval_reads_clip_benchmark_layouts(tmp_path, layout):
    name, write = LAYOUTS[layout]
    write(tmp_path)
    bench = get_benchmark(name, "jp")
    data = bench.load(tmp_path, transform=TF.to_tensor)
    assert isinstance(data, CaptionSet) and data.captions == CAPTIONS["ja"] and data.text_to_image == [0, 1, 2]
    if layout in ("xm3600", "xtd-flat"):
        assert get_benchmark(name, "de").load(tmp_path).captions == CAPTIONS["de"]  # the first caption only
    m = zeroshot.retrieval(Lookup(), name, tmp_path, tokenizer=Lookup().tokenizer, transform=TF.to_tensor,
                           progress=False, ks=(1, 2), language="ja")
    # text -> image: the blue car's caption (0.6, 0, 0.4) is closer to the red image (cos 0.83) than to its own
    # blue one (0.55): ranks 1, 1, 2. image -> text: every image's own caption scores highest: ranks 1, 1, 1.
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3) and m["image_retrieval_recall@2"] == 1
    assert m["image_retrieval_mean_rank"] == pytest.approx(4 / 3) and m["text_retrieval_recall@1"] == 1
    assert (m["images"], m["texts"]) == (3, 3)
    images = torch.tensor([RGB[c] for c in RGB], dtype=torch.float) / 255
    for k in (1, 2):
        expected = clip_benchmark_recall(images, torch.tensor(VECTORS), [0, 1, 2], k)
        assert (m[f"image_retrieval_recall@{k}"], m[f"text_retrieval_recall@{k}"]) == pytest.approx(expected)


def test_recall_equals_clip_benchmark_formula_on_random_features():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    m = zeroshot.retrieval_metrics(images, texts, torch.arange(40), ks=(1, 5, 10))
    for k in (1, 5, 10):
        expected = clip_benchmark_recall(images, texts, list(range(40)), k)
        assert (m[f"image_retrieval_recall@{k}"], m[f"text_retrieval_recall@{k}"]) == pytest.approx(expected)


def test_missing_images_are_left_out_as_clip_benchmark_does(tmp_path, caplog):
    write_xtd_files(tmp_path, "xtd10", False)
    (tmp_path / "xtd10" / "images" / NAMES[1]).unlink()
    data = get_benchmark("xtd10", "de").load(tmp_path)
    assert data.captions == [CAPTIONS["de"][0], CAPTIONS["de"][2]] and data.text_to_image == [0, 1]
    assert "1 of 3 images are missing and left out" in caplog.text


def test_another_language_is_not_read_from_language_blind_layouts(tmp_path):
    from helpers import write_wds_captions

    write_wds_captions(tmp_path / "xtd10", [["a"], ["b"]])
    assert get_benchmark("xtd10").load(tmp_path).captions == ["a", "b"]  # English: the generic layouts apply
    with pytest.raises(DataError, match=r"no xtd10 test data found; expected \[annotations\] xtd10-de.json"):
        get_benchmark("xtd10", "de").load(tmp_path)


# ---- results, the CLI end to end -------------------------------------------------------------------------------------

def test_results_keep_one_entry_per_language():
    res = Results("m")
    for language, top1 in (("en", 0.5), ("de", 0.25), ("de", 0.75)):
        res.add(ResultEntry("zeroshot", "fashion-mnist", "top1", {"top1": top1, "mean_per_class_recall": top1},
                              language=language))
    assert [(e.language, e.headline) for e in res.results] == [("en", 0.5), ("de", 0.75)]
    assert res.get("zeroshot", "fashion-mnist", "de").headline == 0.75
    ((name, doc),) = clip_benchmark_results(Results("m", results=[res.results[1]]))
    assert name.endswith("_de_zeroshot_classification.json") and doc["language"] == "de"
    res.mark_interrupted([("zeroshot", "cifar10", "en"), ("zeroshot", "fashion-mnist", "ja")])
    res.add(ResultEntry("zeroshot", "fashion-mnist", "top1", {"top1": 1.0}))  # English: not the one left out
    assert res.interrupted["not_evaluated"] == [{"task": "zeroshot", "benchmark": "cifar10"},
                                                {"task": "zeroshot", "benchmark": "fashion-mnist", "language": "ja"}]
    res.add(ResultEntry("zeroshot", "fashion-mnist", "top1", {"top1": 1.0}, language="ja"))
    assert res.interrupted["not_evaluated"] == [{"task": "zeroshot", "benchmark": "cifar10"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(export_model(build_model("tiny-vit"), ModelConfig(name="tiny-vit"), path))


def test_cli_end_to_end_in_two_languages(tiny, fashion_root, tmp_path, capsys):
    write_xtd_files(fashion_root, "xtd10", True)
    out = tmp_path / "results.json"
    common = ["--model", tiny, "--root", str(fashion_root), "--no-progress", "--out", str(out)]
    assert main(["eval", *common, "--benchmark", "fashion-mnist,xtd10", "--language", "ja"]) == 0
    assert main(["eval", *common, "--benchmark", "fashion-mnist"]) == 0
    printed = capsys.readouterr().out
    assert "fashion-mnist [ja]: top1=" in printed and "xtd10 [ja]: mean_recall=" in printed
    assert "\nfashion-mnist: top1=" in printed
    entries = {(r["benchmark"], r["language"]): r for r in json.loads(out.read_text())["results"]}
    assert set(entries) == {("fashion-mnist", "ja"), ("xtd10", "ja"), ("fashion-mnist", "en")}
    assert entries[("xtd10", "ja")]["metrics"]["texts"] == 3 and entries[("xtd10", "ja")]["format"] == "xtd"

    adapter = tmp_path / "adapter.safetensors"
    assert main(["adapt", *common, "--benchmark", "fashion-mnist", "--language", "de", "--shots", "1", "--steps",
                 "1", "--save", str(adapter), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert zeroshot.Adapter.load(adapter).language == "de"
    assert main(["eval", *common, "--benchmark", "fashion-mnist", "--adapter", str(adapter)]) == 0
    assert main(["probe", *common, "--benchmark", "fashion-mnist", "--language", "fr", "--l2", "1",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "fashion-mnist [de]: adapt_prompt top1=" in capsys.readouterr().out
    languages = {(r["task"], r["language"]) for r in json.loads(out.read_text())["results"]}
    assert {("adapt_prompt", "de"), ("linear_probe", "fr")} <= languages
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| zeroshot | fashion-mnist [ja] | top1 |" in md and "| zeroshot | fashion-mnist | top1 |" in md

    assert main(["eval", *common, "--benchmark", "fashion-mnist", "--adapter", str(adapter), "--language", "ja"]) == 2
    assert capsys.readouterr().err == (f"error: {adapter}: adapter was fitted on de prompts, not ja (leave "
                                       f"--language out to use the adapter's)\n")


@pytest.mark.parametrize("command", ["eval", "probe", "adapt"])
def test_cli_missing_language_is_one_line_and_exit_2(fashion_root, capsys, command):
    assert main([command, "--model", "tiny-vit", "--benchmark", "fashion-mnist", "--root", str(fashion_root),
                 "--language", "ko"]) == 2
    err = capsys.readouterr().err
    assert err == "error: language: fashion-mnist has no class names and templates in 'ko'; it has en, de, fr, ja, zh\n"


def test_cli_list_by_language(capsys):
    assert main(["list", "--language", "zh", "--languages"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith((" ", "[", "benchmark"))]
    assert names[:-1] == ["imagenet1k", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r", "fashion-mnist",
                          "imagenet-o", "crossmodal3600", "xtd10", "multilingual-mscoco"]
    assert "languages (5): en, de, fr, ja, zh" in out and out.rstrip().endswith("10 benchmarks in zh")
    assert main(["list", "--language", "xx"]) == 2
    assert capsys.readouterr().err.startswith("error: --language: no benchmark has 'xx'; languages: ar, bn, cs")
    assert {b.name for b in list_benchmarks(None) if "de" in b.languages} == {"fashion-mnist", "crossmodal3600",
                                                                             "xtd10", "multilingual-mscoco"}
    assert len(get_benchmark("crossmodal3600").languages) == 36


def test_broken_annotation_files_are_named(tmp_path):
    (tmp_path / "xtd10-de.json").write_text('{"image_paths": ["a.jpg"]}')
    with pytest.raises(DataError, match=r"xtd10-de.json: not CLIP_benchmark's annotation file \(needs"):
        get_benchmark("xtd10", "de").load(tmp_path)
    (tmp_path / "xm3600").mkdir()
    (tmp_path / "xm3600" / "captions.jsonl").write_text('{"image/key": "k0", "en": {"caption": ["a"]}}\n')
    with pytest.raises(DataError, match=r"captions.jsonl:1: expected \"image/key\" and a 'fi' caption"):
        get_benchmark("crossmodal3600", "fi").load(tmp_path)


# ---- the trainer's evaluator in several languages -------------------------------------------------------------------

def test_the_trainers_evaluator_runs_each_benchmark_in_each_language(fashion_root):
    """`eval.languages: [en, de]`: the English then the German prompts reach the text tower, each entry carries its
    language and equals `zeroshot.evaluate` in that language; a language a benchmark lacks stops before training."""
    from vlpretrain.config import EvalConfig, RunConfig, load_config
    from vlpretrain.models import get_tokenizer
    from zeroshot.training import ZeroShotEvaluator

    e = EvalConfig(benchmarks=["fashion-mnist"], root=str(fashion_root), languages=["en", "de"], batch_size=8)
    evaluator = ZeroShotEvaluator(RunConfig(model=ModelConfig(name="tiny-vit"), eval=e))
    assert evaluator.planned() == [("zeroshot", "fashion-mnist", "en"), ("zeroshot", "fashion-mnist", "de")]
    torch.manual_seed(0)
    model = build_model("tiny-vit").eval()
    seen, encode = [], model.encode_text
    model.encode_text = lambda tokens, **kw: (seen.append(tokens), encode(tokens, **kw))[1]
    got = list(evaluator.report(model, lambda: False))
    assert [(name, entry.language) for name, entry in got] == [("fashion-mnist", "en"), ("fashion-mnist/de", "de")]
    tok = get_tokenizer("tiny-vit")
    prompts = []
    for lang in ("en", "de"):
        bench = get_benchmark("fashion-mnist", lang)
        prompts += expand_prompts(bench.classnames, bench.templates)[0]
    assert torch.equal(torch.cat(seen), tok(prompts))
    for _, entry in got:
        assert entry.metrics == zeroshot.evaluate(model, "fashion-mnist", fashion_root, tokenizer=tok, progress=False,
                                                  language=entry.language, batch_size=8)
    assert set(evaluator.run(model, lambda: False)) == {"fashion-mnist", "fashion-mnist/de"}
    with pytest.raises(ConfigError, match=r"^language: fashion-mnist has no class names and templates in 'ko'"):
        ZeroShotEvaluator(RunConfig(model=ModelConfig(name="tiny-vit"), eval=EvalConfig(
            benchmarks=["fashion-mnist"], root=str(fashion_root), languages=["en", "ko"])))
    with pytest.raises(ConfigError, match=r"eval.languages: names a language twice: \[.de., .de.\]$"):
        load_config(None, ["data.train=x", "eval.languages=[de, de]"])
