"""A CoCa on a tokenizer of ours (configs/models/tiny-coca-demo.json): open_clip's text transformer and decoder sized
to a 512-token tokenizer trained on the demo's captions, which pads with id 1 (<s> 0, </s> 2). The model, the
captioning loss, generation and decoding all use the tokenizer's ids; the captioning CLI and metrics work with it;
a model config that disagrees with its tokenizer fails in one line."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import FMNIST, REPO, drawn_image, write_coco_karpathy

import zeroshot
from vlpretrain.config import ModelConfig, RunConfig, TrainConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, export_model, export_open_clip_dir, get_tokenizer, image_transform
from vlpretrain.models.hf_text import special_ids
from vlpretrain.objectives import build_objective
from vlpretrain.tokenizer import train_tokenizer
from zeroshot.cli import main

captioning = importlib.import_module("zeroshot.captioning")  # the package exports a function of the same name
os.environ["HF_HUB_OFFLINE"] = "1"

CAPTION = "a sandal on a plain background"


def demo_captions() -> list[str]:
    """The demo's training captions: every template of configs/captions/fashion_train.txt with every class."""
    def lines(name: str) -> list[str]:
        text = (REPO / "configs" / "captions" / name).read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    return [t.replace("{c}", c) for t in lines("fashion_train.txt") for c in lines("fashion_classes.txt")]


def write_arch(folder: Path, tokenizer_dir: Path, name: str = "coca", **changes) -> str:
    """configs/models/tiny-coca-demo.json reading `tokenizer_dir`, with `changes` ("section.key": value)."""
    arch = json.loads((REPO / "configs" / "models" / "tiny-coca-demo.json").read_text())
    arch["text_cfg"]["hf_tokenizer_name"] = str(tokenizer_dir)
    for key, value in changes.items():
        *section, leaf = key.split(".")
        (arch[section[0]] if section else arch)[leaf] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(arch))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_tokenizer(demo_captions(), 512, tmp_path_factory.mktemp("coca-tok") / "tok", "bpe", lowercase=True)


@pytest.fixture(scope="module")
def arch(tok_dir) -> str:
    return write_arch(tok_dir.parent, tok_dir)


@pytest.fixture(scope="module")
def coca(arch):
    torch.manual_seed(0)
    return build_model(arch)


def test_tokenizer_and_model_use_the_same_small_vocabulary(arch, coca):
    tok = get_tokenizer(arch)
    assert special_ids(tok) == (0, 2, 1)  # <s>, </s>, <pad>: vlpretrain.tokenizer's XLM-R ids
    ids = tok([CAPTION, "A Sandal"])
    words = tok.tokenizer.encode(CAPTION, add_special_tokens=False)
    assert ids.shape == (2, 16) and ids[0].tolist() == [0, *words, 2] + [1] * (14 - len(words))
    short = tok.tokenizer.encode("a sandal", add_special_tokens=False)
    assert ids[1].tolist() == [0, *short, 2] + [1] * (14 - len(short))  # lower-cased first
    assert int(ids.max()) < len(tok.tokenizer) <= 512
    assert coca.text.token_embedding.num_embeddings == 512 and coca.text.pad_id == 1 and coca.pad_id == 1
    out = coca(torch.randn(2, 3, 28, 28), ids)
    assert out["logits"].shape == (2, 15, 512)  # the decoder scores 512 tokens per position, not 49,408
    assert torch.equal(out["labels"], ids[:, 1:])


def test_caption_loss_leaves_out_the_tokenizers_padding(arch, coca):
    obj = build_objective(RunConfig(train=TrainConfig(objective="coca")))
    obj.check_model(coca)
    assert obj.pad_id == 1
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 5, 512, dtype=torch.float64), torch.tensor([[7, 9, 2, 1, 1], [4, 2, 1, 1, 1]])
    # by hand: the mean over the 5 tokens that are not padding of -log softmax at the label
    logp = logits.log_softmax(-1)
    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    expected = -sum(logp[b, t, labels[b, t]] for b, t in kept) / len(kept)
    got = obj.sample_terms({"logits": logits, "labels": labels})["caption"]
    assert got.item() == pytest.approx(2.0 * expected.item(), rel=1e-12)  # caption_weight 2
    with_padding = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)
    assert got.item() != pytest.approx(2.0 * with_padding.item())  # open_clip's pad id 0 would count them
    explicit = build_objective(RunConfig(train=TrainConfig(objective="coca", objective_options={"pad_id": 0})))
    explicit.check_model(coca)
    assert explicit.pad_id == 0  # an option given is kept


def test_decode_cuts_at_the_tokenizers_end_token(arch):
    tok = get_tokenizer(arch)
    words = tok.tokenizer.encode(CAPTION, add_special_tokens=False)
    assert captioning.decode(tok, [0, *words, 2, 1, 1]) == CAPTION
    assert captioning.decode(tok, [0, *words, 2, *words, 2]) == CAPTION  # what follows the end is not text
    assert captioning.decode(tok, [0, *words]) == CAPTION  # no end token: all of it


def test_caption_generates_with_the_tokenizers_ids(arch, coca):
    tok = get_tokenizer(arch)
    images = [drawn_image(i, 28, i) for i in range(3)]
    pixels = torch.stack([image_transform(coca, train=False)(im) for im in images])
    coca.eval()
    ids = coca.generate(pixels, generation_type="top_k", top_k=1, seq_len=12, max_seq_len=16, sot_token_id=0,
                        eos_token_id=2, pad_token_id=1)
    assert (ids[:, 0] == 0).all() and int(ids.max()) < 512
    expected = []
    for row in ids.tolist():
        row = row[1:row.index(2)] if 2 in row else row[1:]
        expected.append(tok.tokenizer.decode(row, skip_special_tokens=True).strip())
    assert zeroshot.caption(coca, pixels, tokenizer=tok, generation_type="top_k", seq_len=12) == expected
    with pytest.raises(ConfigError, match="has 512 tokens, not the 49,408 of open_clip's BPE tokenizer: pass its"):
        zeroshot.caption(coca, pixels)  # open_clip's tokenizer would give ids past the vocabulary


def test_cli_captions_and_scores_with_the_exported_models_tokenizer(arch, coca, tmp_path, capsys):
    model = export_model(coca, ModelConfig(name=arch), tmp_path / "coca.safetensors")
    args = ["caption", "--model", str(model), "--benchmark", "fashion-mnist", "--root", str(FMNIST),
            "--max-images", "3", "--generation-type", "top_k", "--seq-len", "8"]
    assert main(args) == 0
    *lines, summary = capsys.readouterr().out.rstrip("\n").split("\n")
    assert [line.split("\t")[:2] for line in lines] == [["0", "Ankle boot"], ["5000", "Pullover"], ["9999", "Sandal"]]
    assert "fashion-mnist: captions name the image's class for " in summary
    texts = " ".join(line.split("\t")[2] for line in lines)
    assert "<s>" not in texts and "</s>" not in texts and "<pad>" not in texts
    root = write_coco_karpathy(tmp_path / "mscoco", [["a red square"], ["a blue circle", "a circle"]])
    metrics = zeroshot.captioning(coca, "mscoco", root, tokenizer=get_tokenizer(arch), progress=False, meteor=False,
                                  generation_type="top_k", seq_len=8)
    assert metrics["images"] == 2 and 0 <= metrics["bleu_4"] <= 1 and metrics["headline"] == metrics["cider"]


def test_open_clip_folder_export_carries_the_tokenizer(arch, coca, tmp_path):
    import open_clip

    out = export_open_clip_dir(coca.state_dict(), ModelConfig(name=arch), tmp_path / "open_clip")
    theirs_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(theirs_tok([CAPTION]), get_tokenizer(arch)([CAPTION]))
    theirs = open_clip.create_model(f"local-dir:{out}").eval()
    pixels, text = torch.randn(2, 3, 28, 28), theirs_tok([CAPTION, "a bag"])
    coca.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixels, text)["logits"], coca(pixels, text)["logits"])


@pytest.mark.parametrize("changes, message", [
    ({"text_cfg.pad_id": 0}, "text_cfg.pad_id is 0, but its tokenizer {tok} pads with id 1: set text_cfg.pad_id: 1"),
    ({"pad_id": 0}, "pad_id is 0, but its tokenizer {tok} pads with id 1: set pad_id: 1"),
    ({"multimodal_cfg.vocab_size": 100}, "multimodal_cfg.vocab_size 100 is smaller than the {n} tokens of its "
                                         "tokenizer {tok}"),
    ({"text_cfg.hf_tokenizer_name": "/nonexistent/tok"}, "text_cfg.hf_tokenizer_name: '/nonexistent/tok' is not a "
                                                         "local folder"),
])
def test_a_config_that_disagrees_with_its_tokenizer_fails_in_one_line(tok_dir, tmp_path, changes, message):
    path = write_arch(tmp_path, tok_dir, "coca-bad", **changes)
    from transformers import AutoTokenizer

    expected = message.format(tok=tok_dir, n=len(AutoTokenizer.from_pretrained(str(tok_dir))))
    with pytest.raises(ConfigError) as err:
        build_model(path)
    assert str(err.value).startswith(f"{path}: {expected}") and "\n" not in str(err.value)
