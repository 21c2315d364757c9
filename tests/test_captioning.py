"""CoCa captioning: the COCO caption metrics against pycocoevalcap's own scorers and hand-worked values, caption
generation on a tiny CoCa, `zeroshot caption` / `caption-eval`, and CoCa exports that open_clip loads."""

import json

import open_clip
import pytest
import torch
from helpers import drawn_image, write_coco_karpathy
from PIL import Image

import zeroshot
from vlpretrain import build_model
from vlpretrain.config import ModelConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models import export_model, export_open_clip_dir, get_tokenizer, load_model
from zeroshot import caption_scorers as cm
from zeroshot.cli import main

needs_java = pytest.mark.skipif(not cm.java_available(), reason="no java on PATH (make install adds it)")

PREDICTIONS = {1: "A man riding a horse on a beach.", 2: "two dogs playing in the snow",
               3: "A red bus parked next to the street.", 4: "a plate of food, with broccoli"}
REFERENCES = {
    1: ["A man rides a brown horse along the beach.", "A person on horseback at the sea shore.",
        "a man riding a horse near the ocean"],
    2: ["Two dogs play in the snow.", "Dogs running through deep snow!", "two puppies in the snow",
        "A pair of dogs playing outside in winter."],
    3: ["A red double decker bus on a city street.", "a bus parked at the side of the road"],
    4: ["A plate with broccoli and rice.", "a white plate of food with vegetables", "Broccoli, meat and rice."],
}


def _pycocoevalcap(references, predictions, tokenize):
    """The COCO evaluation's own steps (pycocoevalcap.eval.COCOEvalCap.evaluate): ground truth and results
    tokenized separately, then its Bleu(4), Rouge and Cider scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = tokenize(references), tokenize({k: [v] for k, v in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {**{f"bleu_{n}": b for n, b in enumerate(bleu, 1)}, "rouge_l": Rouge().compute_score(gts, res)[0],
            "cider": Cider().compute_score(gts, res)[0]}


def _ptb(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def _python(captions):
    return {k: [cm.python_tokenize(c) for c in caps] for k, caps in captions.items()}


@needs_java
def test_metrics_equal_pycocoevalcap_with_its_ptb_tokenizer():
    got = cm.caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert got == pytest.approx(_pycocoevalcap(REFERENCES, PREDICTIONS, _ptb), rel=1e-12, abs=0)
    assert set(got) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    assert 0 < got["bleu_4"] < got["bleu_1"] < 1 and got["cider"] > 0


def test_metrics_without_java_use_the_python_tokenizer(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    got = cm.caption_metrics(PREDICTIONS, REFERENCES)
    assert got == pytest.approx(_pycocoevalcap(REFERENCES, PREDICTIONS, _python), rel=1e-12, abs=0)
    assert "meteor" not in got and "no java on PATH" in cm.left_out()["meteor"]
    assert "download" in cm.left_out()["spice"]


@needs_java
def test_python_tokenizer_matches_ptb_on_captions():
    captions = [c for caps in REFERENCES.values() for c in caps] + list(PREDICTIONS.values()) + [
        "It's a cat's toy; don't touch", 'A "red" bus (parked) on 5th St.', "The U.S. flag... waving -- high",
        "a black-and-white photo of 3,000 people at 10:30 p.m.", "hello [world] {x} 'quoted' `tick`",
        "Mr. Smith's dog isn't there, they're gone & we'll see 1.5 km/h", "A Man's HAT?! ok", "the kids' toys"]
    ptb = _ptb({i: [c] for i, c in enumerate(captions)})
    assert [cm.python_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


def test_hand_worked_values(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)  # the plain captions tokenize alike either way
    exact = cm.caption_metrics({1: "a man riding a horse", 2: "two dogs play in the snow"},
                               {1: ["a man riding a horse", "a person on a horse"], 2: ["two dogs play in the snow"]})
    assert exact["bleu_4"] == pytest.approx(1.0, abs=1e-8) and exact["rouge_l"] == pytest.approx(1.0)
    # ROUGE-L: LCS of "a dog runs on the beach" and "a brown dog runs along the beach" is "a dog runs the beach",
    # 5 tokens: precision 5/6, recall 5/7, F with beta = 1.2 as pycocoevalcap weighs recall
    p, r, b2 = 5 / 6, 5 / 7, 1.2 ** 2
    got = cm.caption_metrics({"x": "A dog runs on the beach."}, {"x": ["a brown dog runs along the beach"]})
    assert got["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-12)
    assert got["bleu_1"] == pytest.approx(5 / 6 * torch.exp(torch.tensor(1 - 7 / 6)).item(), rel=1e-6)


@pytest.mark.slow
@needs_java
def test_meteor_with_java():
    got = cm.caption_metrics(PREDICTIONS, REFERENCES)  # METEOR's scorer loads its paraphrase table: ~20 s
    assert 0 < got["meteor"] < 1 and "meteor" not in cm.left_out()


def test_metrics_name_a_prediction_without_references():
    with pytest.raises(Exception, match="prediction 5 has no references"):
        cm.caption_metrics({5: "a cat"}, REFERENCES)


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    return build_model("tiny-coca")


@pytest.fixture(scope="module")
def images():
    return [drawn_image(i, 32, i) for i in range(3)]


@pytest.mark.parametrize("options", [{}, {"generation_type": "top_k", "top_k": 5},
                                     {"generation_type": "top_p", "top_p": 0.9, "temperature": 0.8}])
def test_caption_gives_one_string_per_image_repeatably(coca, images, options):
    coca.train()
    first = zeroshot.caption(coca, images, seed=3, batch_size=2, **options)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert "<start_of_text>" not in "".join(first) and "<end_of_text>" not in "".join(first)
    assert zeroshot.caption(coca, images, seed=3, batch_size=2, **options) == first
    assert coca.training  # eval mode only while generating
    if options:  # sampling: another seed, other captions
        assert zeroshot.caption(coca, images, seed=4, batch_size=2, **options) != first


def test_caption_equals_open_clip_generate_decoded(coca, images):
    from vlpretrain.models import image_transform

    pixels = torch.stack([image_transform(coca, train=False)(im) for im in images])
    coca.eval()
    ids = coca.generate(pixels, seq_len=16)
    # open_clip's own recipe: decode, cut at <end_of_text>, drop <start_of_text>
    expected = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for row in ids]
    assert zeroshot.caption(coca, pixels) == expected
    assert zeroshot.caption(coca, images[0]) == expected[:1]


def test_caption_refuses_other_models_and_options(coca, images):
    with pytest.raises(ConfigError, match="has no text decoder.*needs a CoCa model"):
        zeroshot.caption(build_model("tiny-vit"), images)
    with pytest.raises(ConfigError, match="unknown generation option 'topk'"):
        zeroshot.caption(coca, images, topk=3)
    with pytest.raises(ConfigError, match="longer than the model's text context"):
        zeroshot.caption(coca, images, seq_len=40)


def test_cli_captions_a_folder(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        drawn_image(i, 32, i).save(folder / f"{i}.png")
    out = tmp_path / "captions.json"
    assert main(["caption", str(folder), "--model", "tiny-coca", "--output", str(out),
                 "--generation-type", "top_k", "--top-k", "4", "--seq-len", "12"]) == 0
    doc = json.loads(out.read_text())
    assert sorted(doc["captions"]) == [str(folder / f"{i}.png") for i in range(3)]
    assert doc["generation"]["generation_type"] == "top_k" and doc["generation"]["seq_len"] == 12
    assert not list(tmp_path.glob("*.tmp"))
    capsys.readouterr()
    assert main(["caption", str(folder / "0.png"), "--model", "tiny-coca", "--num-beams", "2",
                 "--num-beam-groups", "1"]) == 0
    path, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(folder / "0.png") and isinstance(text, str)


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-vit"], "error: model: CLIP has no text decoder"),
    (["--model", "tiny-coca", "--num-beams", "4", "--num-beam-groups", "3"], "error: num_beams: 4 beams cannot"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, args, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "a.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_cli_caption_eval_writes_a_captioning_entry(tmp_path, capsys):
    root = write_coco_karpathy(tmp_path / "mscoco", [["a red square", "a square in red"], ["a blue circle"],
                                                      ["a green shape", "something green"]])
    out = tmp_path / "results.json"
    assert main(["caption-eval", "--model", "tiny-coca", "--benchmark", "mscoco", "--root", str(root),
                 "--out", str(out), "--no-progress", "--no-meteor", "--num-beams", "2", "--num-beam-groups", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mscoco: cider=" in printed and "left out: meteor (not asked for); spice (" in printed
    entry = json.loads(out.read_text())["results"][0]
    assert (entry["task"], entry["benchmark"], entry["metric"]) == ("captioning", "mscoco", "cider")
    assert entry["metrics"]["images"] == 3 and entry["metrics"]["headline"] == entry["metrics"]["cider"]
    assert main(["caption-eval", "--model", "tiny-coca", "--benchmark", "cifar10", "--root", str(root)]) == 2


def test_coca_exports_load_here_and_in_open_clip(coca, tmp_path, images):
    cfg = ModelConfig(name="tiny-coca")
    text = get_tokenizer("tiny-coca")(["a red square", "a blue circle"])
    pixels = torch.randn(2, 3, 28, 28)
    coca.eval()
    want = coca(pixels, text)
    ours = load_model(str(export_model(coca, cfg, tmp_path / "coca.safetensors"))).eval()
    theirs, _, preprocess = open_clip.create_model_and_transforms(
        "local-dir:" + str(export_open_clip_dir(coca.state_dict(), cfg, tmp_path / "open_clip")))
    assert type(theirs).__name__ == "CoCa" and hasattr(theirs, "text_decoder")
    theirs.eval()
    for model in (ours, theirs):
        got = model(pixels, text)
        for key in ("image_features", "text_features", "logits", "labels"):
            assert torch.equal(got[key], want[key]), key
        assert got["logit_scale"].reshape(()) == want["logit_scale"].reshape(())
        assert zeroshot.caption(model, images) == zeroshot.caption(coca, images)


def test_coca_classifies_zero_shot(coca, images):
    probs = zeroshot.classify(coca, images, ["red square", "blue circle"])  # its towers as any CLIP's
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))
