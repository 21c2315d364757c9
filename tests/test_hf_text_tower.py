"""Hugging Face text towers (a tiny XLM-R built from a local config) and tokenizers trained on shard captions."""

import io
import json
import os
import shutil
import tarfile

import pytest
import torch
import torch.nn.functional as F
from helpers import COMMON, assert_same_run, losses, moe_zero3_follows_zero0, run

from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, get_tokenizer
from vlpretrain.tokenizer import train_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"

CAPTIONS = {
    "en": "a photo of an ankle boot, black and white.",
    "de": "Ein Foto eines Stiefels für Damen, schwarz-weiß.",
    "fr": "Une photo d'une robe à manches longues, très élégante.",
    "zh": "一张踝靴的照片，黑白的。",
    "ja": "アンクルブーツの写真です、白黒。",
}


def corpus() -> list[str]:
    return [f"{c} {i}" for i in range(20) for c in CAPTIONS.values()]


def tiny_xlmr(folder, tokenizer_dir, vocab_size=49408, weights=False, seed=0):
    """A tiny XLM-R-style encoder folder (config, and weights when asked) and an open_clip model JSON using it."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    else:
        config.save_pretrained(str(folder))
    arch = {"embed_dim": 16,
            "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 7},
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(tokenizer_dir),
                         "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}}
    path = folder.parent / f"{folder.name}-clip.json"
    path.write_text(json.dumps(arch))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(corpus(), 200, tmp_path_factory.mktemp("tok") / "unigram")


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_tokenizer_round_trips_every_demo_language(tmp_path, kind):
    from transformers import AutoTokenizer

    out = train_tokenizer(corpus(), 300, tmp_path / kind, kind)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) <= 300 and (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    for lang, text in CAPTIONS.items():
        ids = tok(text).input_ids
        assert ids[0] == 0 and ids[-1] == 2, lang
        assert tok.unk_token_id not in ids, lang
        assert tok.decode(ids, skip_special_tokens=True) == text, lang
    # --lowercase: "Hose" and "hose" are one token sequence, so prompts match captions whatever their case
    low = AutoTokenizer.from_pretrained(str(train_tokenizer(corpus(), 300, tmp_path / "low", kind, lowercase=True)))
    assert low(CAPTIONS["de"]).input_ids == low(CAPTIONS["de"].lower()).input_ids
    assert low.decode(low(CAPTIONS["de"]).input_ids, skip_special_tokens=True) == CAPTIONS["de"].lower()


def test_tokenizer_cli_trains_on_shard_captions(tmp_path):
    from transformers import AutoTokenizer

    from vlpretrain.cli import main

    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for i, text in enumerate(corpus()[s::2]):
                for ext, data in (("jpg", b"not read"), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert main(["tokenizer", "train", str(tmp_path / "shard-{0..1}.tar"), "--vocab-size", "150",
                 "--out", str(tmp_path / "tok"), "--type", "bpe"]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.decode(tok(CAPTIONS["zh"]).input_ids, skip_special_tokens=True) == CAPTIONS["zh"]
    # the loader's and zeroshot's tokenizer for a model naming that folder: the same ids, padded with <pad>
    arch = tiny_xlmr(tmp_path / "xlmr", tmp_path / "tok", vocab_size=len(tok))
    ids = get_tokenizer(arch)(["a photo of an ankle boot"])
    want = tok("a photo of an ankle boot").input_ids
    want = want if len(want) <= 16 else [*want[:15], 2]  # truncated, still closed by </s>
    assert ids[0].tolist() == want + [1] * (16 - len(want))
    assert main(["tokenizer", "train", str(tmp_path / "shard-{0..1}.tar"), "--vocab-size", "3",
                 "--out", str(tmp_path / "t2")]) == 2


def test_pretrained_folder_loads_its_weights_and_pools_like_open_clip(tmp_path, tok_dir):
    """Weights come from the folder; the text feature is the mean of non-pad hidden states, projected."""
    from transformers import AutoModel

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir, weights=True, seed=3)
    model = build_model(arch)
    ref = AutoModel.from_pretrained(str(tmp_path / "xlmr"), add_pooling_layer=False).eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.text.transformer.state_dict()[k], v), k
    model.eval()
    tokens = get_tokenizer(arch)([CAPTIONS["de"], CAPTIONS["zh"]])
    mask = (tokens != 1).long()
    hidden = ref(input_ids=tokens, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    want = pooled @ model.text.proj.weight.T
    torch.testing.assert_close(model.encode_text(tokens), want, rtol=1e-5, atol=1e-6)
    # a folder with only config.json starts from scratch (seeded), not from those weights
    scratch = tiny_xlmr(tmp_path / "scratch", tok_dir)
    assert not torch.equal(build_model(scratch).text.transformer.embeddings.word_embeddings.weight,
                           ref.embeddings.word_embeddings.weight)


def test_missing_folder_and_other_layers_fail_in_one_line(tmp_path, tok_dir):
    from vlpretrain.config import ModelConfig, MoEConfig

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir)
    with pytest.raises(ConfigError, match="not a local folder"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**json.loads(open(arch).read()),
                                   "text_cfg": {"hf_model_name": "xlm-roberta-base"}}))
        build_model(str(bad))
    from vlpretrain.models.hf_text import hf_feed_forward

    with pytest.raises(ConfigError, match=r"^model.moe: text layer 3 \(Linear\) has no BERT-style feed-forward"):
        hf_feed_forward(torch.nn.Linear(2, 2), "model.moe: text layer 3")  # e.g. a T5 block: its MLP is elsewhere
    model = build_model(ModelConfig(name=arch, moe=MoEConfig(num_experts=2, towers="image")))
    assert sum(type(m).__name__ == "MoEMLP" for m in model.modules()) == 1  # every_2 of 2
    # the few-shot adapters and zeroshot's default tokenizer stop in one line too
    from zeroshot.adapters import check_text_tower
    from zeroshot.classifier import default_tokenizer

    with pytest.raises(ConfigError, match="adapters need open_clip's CLIP text tower"):
        check_text_tower(model, "prompt")
    with pytest.raises(ConfigError, match="Hugging Face encoder: pass its tokenizer"):
        default_tokenizer(model)


def test_locked_hf_layers_stay_bit_identical(tmp_path, tok_dir):
    """LiT with the last HF layer unlocked: embeddings and layer 0 never change; layer 1 and the projection do."""
    from vlpretrain.config import ModelConfig

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=arch, lock_text=True, lock_text_unlocked_blocks=1))
    hf = model.text.transformer
    frozen = {k: v.clone() for k, v in [*hf.embeddings.state_dict().items(),
                                         *hf.encoder.layer[0].state_dict(prefix="l0.").items()]}
    free = {"l1": hf.encoder.layer[1].attention.self.query.weight.clone(), "proj": model.text.proj.weight.clone()}
    assert not any(p.requires_grad for p in hf.embeddings.parameters())
    assert all(p.requires_grad for p in hf.encoder.layer[1].parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tok = get_tokenizer(arch)
    for step in range(3):
        images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(step))
        out = model(images, tok(list(CAPTIONS.values())[:4]))
        logits = out["logit_scale"] * F.normalize(out["image_features"]) @ F.normalize(out["text_features"]).T
        loss = F.cross_entropy(logits, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    now = {**hf.embeddings.state_dict(), **hf.encoder.layer[0].state_dict(prefix="l0.")}
    for k, v in frozen.items():
        assert torch.equal(now[k], v), k
    assert not torch.equal(hf.encoder.layer[1].attention.self.query.weight, free["l1"])
    assert not torch.equal(model.text.proj.weight, free["proj"])


def test_zero_shot_head_with_the_hf_tokenizer(tmp_path, tok_dir):
    """zeroshot's head for an HF tower: each class's mean of normalised prompt features, computed by hand."""
    from zeroshot.classifier import build_classifier

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir)
    torch.manual_seed(1)
    model = build_model(arch).eval()
    tok = get_tokenizer(arch)
    classes, templates = ["Stiefel", "Kleid"], ["ein Foto eines {}.", "{}, schwarz-weiß."]
    head = build_classifier(model, tok, classes, templates)
    with torch.no_grad():
        want = torch.stack([F.normalize(F.normalize(model.encode_text(tok([t.format(c) for t in templates])))
                                        .mean(0), dim=0) for c in classes], 1)
    torch.testing.assert_close(head, want, rtol=1e-5, atol=1e-6)


def test_zero3_follows_zero0_with_an_hf_tower(tmp_path, tok_dir):
    """The trainer under ZeRO-3 with exact accumulation (2 x 4) follows ZeRO-0 on one batch of 8, step for step;
    in bf16 under ZeRO-2 it follows within bf16's rounding."""

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir)
    common = [*COMMON, f"model.name={arch}"]
    run(tmp_path / "z0", *common, "data.batch_size=8", extra=["--per-sample"])
    run(tmp_path / "z3", *common, "data.batch_size=4", "train.grad_accum=2", "train.zero_stage=3",
        extra=["--per-sample"])
    assert_same_run(tmp_path / "z0", tmp_path / "z3", 3)
    # bf16 (ZeRO-2, exact accumulation 2 x 4) follows the fp32 trajectory: bf16 rounds, so close, not equal
    run(tmp_path / "bf16", *common, "data.batch_size=4", "train.grad_accum=2", "train.zero_stage=2",
        "train.precision=bf16", extra=["--per-sample"])
    fp32, bf16 = losses(tmp_path / "z0"), losses(tmp_path / "bf16")
    assert sorted(bf16) == [1, 2, 3] and abs(fp32[3] - fp32[1]) > 0.05 * fp32[1]  # the loss moves: a trajectory
    for s in fp32:
        assert bf16[s] == pytest.approx(fp32[s], rel=2e-2), s


def test_tokenizer_vocabulary_too_small_for_the_characters_is_one_line(tmp_path):
    from vlpretrain.errors import ConfigError
    from vlpretrain.tokenizer import train_tokenizer

    texts = ["一只猫坐在垫子上", "犬が走っている", "ein Hund läuft schnell"] * 5
    with pytest.raises(ConfigError, match=r"^--vocab-size: 20 tokens cannot hold every character"):
        train_tokenizer(texts, 20, tmp_path / "tok")


# ---- MoE upcycling of the HF tower's feed-forward ------------------------------------------------------------------

UPCYCLE = dict(num_experts=4, top_k=2, towers="both", layers="all", capacity_factor=8.0, eval_capacity_factor=0.0)


def test_upcycled_hf_tower_computes_the_dense_function(tmp_path, tok_dir):
    """Every expert copies its layer's intermediate.dense / activation / output.dense, so with no token dropped the
    upcycled tower gives the dense features; the export reloads to the same; dropping tokens changes them."""
    from vlpretrain.config import MoEConfig
    from vlpretrain.models import load_model, moe_layers, upcycle

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir, weights=True, seed=3)
    dense = build_model(arch).eval()
    moe = upcycle(dense, MoEConfig(**UPCYCLE), tmp_path / "moe.safetensors", arch=arch)
    text = [m for m in moe_layers(moe) if m.tower == "text"]
    assert [m.block for m in text] == [0, 1] and len(moe_layers(moe)) == 4
    for i, layer in enumerate(dense.text.transformer.encoder.layer):
        upcycled = moe.text.transformer.encoder.layer[i]
        assert upcycled.intermediate is text[i] and isinstance(upcycled.output.dense, torch.nn.Identity)
        for expert in text[i].experts:
            assert torch.equal(expert[0].weight, layer.intermediate.dense.weight)
            assert torch.equal(expert[2].bias, layer.output.dense.bias)
            assert type(expert[1]) is type(layer.intermediate.intermediate_act_fn)  # gelu, from the HF config
    tokens = get_tokenizer(arch)(list(CAPTIONS.values()))
    with torch.no_grad():
        want = dense.encode_text(tokens)
        for training in (False, True):
            torch.testing.assert_close(moe.train(training).encode_text(tokens), want, rtol=1e-5, atol=1e-6)
            assert all(m.aux.dropped.item() == 0 for m in text)
        torch.testing.assert_close(load_model(str(tmp_path / "moe.safetensors")).eval().encode_text(tokens), want,
                                   rtol=1e-5, atol=1e-6)
        squeezed = upcycle(dense, MoEConfig(**{**UPCYCLE, "capacity_factor": 0.25})).train()
        assert not torch.allclose(squeezed.encode_text(tokens), want, atol=1e-3)


def test_trainer_hf_moe_tower_zero3_follows_zero0(tmp_path, tok_dir):
    """An HF tower with MoE feed-forwards trains with exact accumulation under ZeRO-3 as under ZeRO-0."""

    arch = tiny_xlmr(tmp_path / "xlmr", tok_dir)
    moe = [f"model.name={arch}", "model.moe.num_experts=4", "model.moe.towers=text", "model.moe.layers=all",
           "model.moe.jitter=0.1", "model.moe.capacity_factor=8.0", "train.grad_accum=2", "train.steps=2",
           "train.warmup_steps=1", "train.eps=0.01"]
    row = moe_zero3_follows_zero0(tmp_path, *moe)
    assert row["moe/text/dropped"] == 0.0 and "moe/text/b1/e3" in row and "moe/image/balance" not in row


# ---- folders named in the model JSON --------------------------------------------------------------------------------

def test_hf_folders_resolve_against_the_json_then_the_working_folder(tmp_path, tok_dir, monkeypatch):
    """`hf_model_name: enc` beside the JSON wins over an `enc` in the working folder; `hf_tokenizer_name: tok`,
    absent beside the JSON, is the working folder's."""
    from transformers import AutoModel, AutoTokenizer

    models, work = tmp_path / "models", tmp_path / "work"
    tiny_xlmr(models / "enc", tok_dir, weights=True, seed=5)
    tiny_xlmr(work / "enc", tok_dir, weights=True, seed=6)
    shutil.copytree(tok_dir, work / "tok")
    arch = json.loads((models / "enc-clip.json").read_text())
    arch["text_cfg"].update(hf_model_name="enc", hf_tokenizer_name="tok")
    path = models / "relative-clip.json"
    path.write_text(json.dumps(arch))
    monkeypatch.chdir(work)
    model = build_model(str(path))
    beside = AutoModel.from_pretrained(str(models / "enc"), add_pooling_layer=False)
    assert torch.equal(model.text.transformer.embeddings.word_embeddings.weight,
                       beside.embeddings.word_embeddings.weight)
    ids = get_tokenizer(str(path))([CAPTIONS["fr"]])[0].tolist()
    want = AutoTokenizer.from_pretrained(str(tok_dir))(CAPTIONS["fr"]).input_ids
    want = want if len(want) <= 16 else [*want[:15], 2]
    assert ids == want + [1] * (16 - len(want))
    # from a working folder without `tok` it is not found, and the message names it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"text_cfg.hf_tokenizer_name: 'tok' is not a local folder"):
        build_model(str(path))
