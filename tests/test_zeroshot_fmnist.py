"""Real data, end to end: Debian's Fashion-MNIST written as captioned shards, the tiny CLIP trained on them by the
trainer (configs/demo.yaml, shortened, one process), then zero-shot evaluated on the test images.

The training captions come from configs/captions/fashion_train.txt, which shares no template with the benchmark's
evaluation prompts. Chance is 0.1.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import FMNIST, REPO, subprocess_env
from PIL import Image

import zeroshot
from vlpretrain.data import write_shards
from vlpretrain.formats import read_idx
from vlpretrain.models import load_model

STEPS = 150


@pytest.fixture(scope="session")
def fmnist_run(tmp_path_factory):
    """A run folder of the trainer: 150 steps of 128 Fashion-MNIST images with templated captions."""
    tmp = tmp_path_factory.mktemp("fmnist")
    m = write_shards(str(FMNIST), tmp / "shards", "labelled", prefix="fm", shard_size=5000, workers=2,
                     templates=str(REPO / "configs" / "captions" / "fashion_train.txt"),
                     classes=str(REPO / "configs" / "captions" / "fashion_classes.txt"), progress=False)
    assert m["samples"] == 60000 and len(m["shards"]) == 12
    env = subprocess_env()
    run = tmp / "run"
    cmd = [sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.train={tmp}/shards/fm-{{000000..000011}}.tar", "--set", f"train.output_dir={run}",
           "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=20", "--set", "train.zero_stage=0",
           "--set", "eval.max_images=2000", "--set", "train.progress=false", "--set", "train.log_every=25"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_trainer_run_scores_well_above_chance(fmnist_run, capsys):
    results = json.loads((fmnist_run / "results.json").read_text())
    (entry,) = [e for e in results["results"] if e["task"] == "zeroshot"]
    assert entry["benchmark"] == "fashion-mnist" and results["model"].endswith("model.safetensors")
    metrics = entry["metrics"]
    with capsys.disabled():
        print(f"\nfashion-mnist zero-shot after {STEPS} trainer steps: "
              + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    assert metrics["images"] == 2000
    assert metrics["top1"] > 0.5
    assert metrics["top5"] > 0.9
    # the exported model, evaluated on its own, gives the trainer's numbers
    again = zeroshot.evaluate(load_model(str(fmnist_run / "model.safetensors")), "fashion-mnist", FMNIST,
                              max_images=2000, progress=False)
    assert again["top1"] == pytest.approx(metrics["top1"], abs=1e-9)


@pytest.mark.slow
def test_trainer_run_linear_probe(fmnist_run, tmp_path, capsys):
    """configs/demo.yaml asks for a linear probe at the end; the CLI probes the exported model the same way."""
    results = json.loads((fmnist_run / "results.json").read_text())
    (probe,) = [e for e in results["results"] if e["task"] == "linear_probe"]
    m = probe["metrics"]
    with capsys.disabled():
        print(f"\nfashion-mnist linear probe (2000 train / 2000 test images): top1={m['top1']:.4f} l2={m['l2']:.3g}")
    assert m["images"] == 2000 and m["num_train"] == 2000 and m["top1"] > 0.6 and m["l2"] > 0
    out = tmp_path / "probe.json"
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "zeroshot.cli", "probe", "--model", str(fmnist_run / "model.safetensors"),
                        "--benchmark", "fashion-mnist", "--root", str(FMNIST), "--max-images", "1000",
                        "--shots", "20", "--l2", "1.0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["task"] == "linear_probe" and entry["metrics"]["num_train"] == 200  # 20 shots x 10 classes
    assert entry["metrics"]["l2"] == 1.0 and entry["metrics"]["top1"] > 0.4
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2  # train and test features cached


@pytest.mark.slow
def test_classify_own_images_with_own_labels(fmnist_run):
    """Ad hoc use: PIL images and the user's label strings, probabilities over them."""
    model = load_model(str(fmnist_run / "model.safetensors"))
    test_images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:200]
    test_labels = torch.from_numpy(read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:200].astype(np.int64))
    names = zeroshot.get_benchmark("fashion-mnist").classnames
    probs = zeroshot.classify(model, [Image.fromarray(im) for im in test_images], names,
                              templates=["a photo of a {c}.", "a photo of the {c}."])
    assert probs.shape == (200, 10) and torch.allclose(probs.sum(1), torch.ones(200), atol=1e-5)
    assert (probs.argmax(1) == test_labels).float().mean() > 0.4
