"""data.val: held-out shards evaluated during training (loss and retrieval recall), on 1 and 2 processes."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, SCRIPT, launch, subprocess_env
from PIL import Image, ImageDraw

from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, write_shards
from vlpretrain.models import get_tokenizer, image_transform, load_model
from vlpretrain.retrieval import retrieval_metrics

ENV = subprocess_env()
WORDS = ["red", "green", "blue", "yellow", "white", "black", "grey", "pink"]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """24 drawn images with captions, as 4 shards."""
    tmp = tmp_path_factory.mktemp("val")
    src = tmp / "photos"
    src.mkdir()
    for i in range(24):
        im = Image.new("RGB", (32, 32), (i * 10 % 256, i * 37 % 256, i * 91 % 256))
        ImageDraw.Draw(im).rectangle([i % 8, i % 5, 20 + i % 9, 24], fill=(255 - i * 10, 80, i * 5))
        im.save(src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text(f"a {WORDS[i % 8]} square number {i}")
    write_shards(src, tmp / "shards", "folder", shard_size=6, progress=False)
    return str(tmp / "shards" / "shard-{000000..000003}.tar")


def train(out: Path, val: str, nproc: int = 1) -> None:
    args = [str(out), "train.steps=4", "eval.every=2", f"data.val={val}", "eval.val_samples=16"]
    r = subprocess.run(launch(nproc, [str(SCRIPT), *args]), env=ENV, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]


def val_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("eval") == "val"}


def test_validation_recall_equals_the_exported_model_on_the_same_samples(tmp_path, val_shards):
    out = tmp_path / "run"
    train(out, val_shards)
    rows = val_rows(out)
    assert sorted(rows) == [2, 4]
    got = rows[4]
    assert got["images"] == 16 and got["texts"] == 16  # eval.val_samples, in whole batches of 4
    # the same 16 samples through the exported final model, ranked directly
    model = load_model(str(out / "model.safetensors")).eval()
    cfg = DataConfig(train=val_shards, batch_size=4, workers=1, shuffle_buffer=0, augment=False)
    loader = build_loader(cfg, image_transform(model, train=False), get_tokenizer("tiny-vit"), rank=0, world_size=1)
    feats_i, feats_t = [], []
    with torch.no_grad():
        for i, (images, texts) in enumerate(loader):
            if i == 4:
                break
            feats_i.append(model.encode_image(images))
            feats_t.append(model.encode_text(texts))
    want = retrieval_metrics(torch.cat(feats_i), torch.cat(feats_t), torch.arange(16))
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5", "image_retrieval_mean_rank", "mean_recall"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["loss"] > 0 and (out / "loss.png").is_file()


@pytest.mark.slow
def test_validation_metrics_in_a_two_process_run(tmp_path, val_shards):
    out = tmp_path / "run2"
    train(out, val_shards, nproc=2)
    rows = val_rows(out)
    assert sorted(rows) == [2, 4]
    assert rows[4]["images"] == 16  # 2 ranks x 2 batches of 4
    assert all(0.0 <= rows[4][f"text_retrieval_recall@{k}"] <= 1.0 for k in (1, 5, 10))
