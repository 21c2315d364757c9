"""Zero-shot top-1 after training on a class-sorted source: source-order shards read one after another (what
make-shards and the loader did before issue #12) against the default shuffled write and interleaved loader.

Draws a CIFAR-10-like set: 10 classes named as CIFAR-10's, each a pattern of its own (shape and colour, with random
position, size, tint and noise), saved as class folders `train/<class>/*.jpg` sorted on disk like an ImageFolder,
and a held-out test set drawn the same way from other seeds. Training captions come from a small templates file
("a photo of a {c}." and the like). Both arms train the tiny ViT of configs/demo.yaml in one process (ZeRO-0) for
the same steps with the loader's default settings, and are evaluated zero-shot on the test set with the CLIP
paper's CIFAR-10 prompt ensemble (zeroshot/assets/cifar10.json), none of which is a training template.

    before: make-shards --keep-order --shard-size PER_CLASS (one class a shard), data.interleave_shards=1
    after:  make-shards --shard-size PER_CLASS (defaults: shuffled), data.interleave_shards at its default

    python benchmarks/sorted_source.py [--per-class 2500] [--test-per-class 100] [--steps 60] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ["a photo of a {c}.", "a picture of a {c}.", "an image of the {c}.", "a drawing of a {c}.",
             "a {c} on a plain background.", "{c}"]
# (shape, colour) per class, in CIFAR-10's label order
PATTERNS = [("disc", (220, 40, 40)), ("square", (40, 200, 60)), ("triangle", (50, 80, 230)),
            ("cross", (230, 210, 40)), ("ring", (210, 60, 210)), ("hbars", (40, 210, 220)),
            ("vbars", (240, 240, 240)), ("diamond", (240, 140, 30)), ("checker", (130, 60, 200)),
            ("xmark", (150, 150, 150))]


def draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One 32 px picture: a dark noisy background and the class's shape, jittered in place, size and tint."""
    bg = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(7, 12)
    cx, cy = rng.uniform(r, size - r, 2)
    tint = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        d.ellipse(box, fill=tint)
    elif shape == "square":
        d.rectangle(box, fill=tint)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=tint)
    elif shape == "cross":
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=tint)
        d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=tint)
    elif shape == "ring":
        d.ellipse(box, outline=tint, width=3)
    elif shape in ("hbars", "vbars"):
        for k in range(3):
            o = -r + k * r
            bar = (cx - r, cy + o - 1.5, cx + r, cy + o + 1.5) if shape == "hbars" else (cx + o - 1.5, cy - r,
                                                                                          cx + o + 1.5, cy + r)
            d.rectangle(bar, fill=tint)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=tint)
    elif shape == "checker":
        q = r / 2
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    d.rectangle((cx - r + i * q, cy - r + j * q, cx - r + (i + 1) * q, cy - r + (j + 1) * q),
                                fill=tint)
    else:  # xmark
        d.line((cx - r, cy - r, cx + r, cy + r), fill=tint, width=3)
        d.line((cx - r, cy + r, cx + r, cy - r), fill=tint, width=3)
    return img


def make_set(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    """Class folders root/<class>/NNNNN.jpg, every class from its own seeded stream."""
    for label, name in enumerate(classes):
        rng = np.random.default_rng([seed, label])
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            draw(*PATTERNS[label], rng).save(folder / f"{i:05d}.jpg", quality=90)


class Folder(torch.utils.data.Dataset):
    """(image, label) of a class-folder tree, labels in the given class order."""

    def __init__(self, root: Path, classes: list[str], transform):
        self.items = [(p, k) for k, c in enumerate(classes) for p in sorted((root / c).glob("*.jpg"))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


def train_arm(name: str, shards: str, out: Path, a: argparse.Namespace, extra: list[str]) -> dict:
    """One `vlpretrain train` process on `shards`; its log lines, metrics rows and wall time."""
    overrides = [f"data.train={shards}", f"data.batch_size={a.batch}", f"train.steps={a.steps}",
                 f"train.output_dir={out}", "train.zero_stage=0", f"train.warmup_steps={a.warmup}",
                 "train.progress=false", "train.log_every=10", "eval.benchmarks=[]", "eval.linear_probe=false",
                 f"train.seed={a.seed}", f"data.seed={a.seed}", *extra]
    cmd = [sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [x for x in rows if "loss" in x], "stderr": r.stderr, "seconds": time.perf_counter() - start}


def zero_shot(model_path: Path, test: Path, classes: list[str]) -> float:
    """Top-1 of the CIFAR-10 prompt ensemble on the drawn test set."""
    import zeroshot
    from vlpretrain.models import image_transform, load_model
    from zeroshot.datasets.base import EvalSet

    model = load_model(str(model_path))
    data = EvalSet(Folder(test, classes, image_transform(model, train=False)), classes,
                   zeroshot.get_benchmark("cifar10").templates, "folder", test)
    return zeroshot.run_zeroshot(model, data, batch_size=250)["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=2500, help="training images per class (and per sorted shard)")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="work in this folder and leave it (default: a temporary one)")
    a = p.parse_args()

    from vlpretrain.config import DataConfig
    from vlpretrain.data import write_shards
    from zeroshot import get_benchmark

    classes = get_benchmark("cifar10").classnames
    defaults = DataConfig(train="unused")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        t0 = time.perf_counter()
        make_set(work / "train", classes, a.per_class, seed=1000 + a.seed)
        make_set(work / "test", classes, a.test_per_class, seed=2000 + a.seed)
        (work / "captions.txt").write_text("\n".join(TEMPLATES) + "\n")
        arms = {"before": (True, ["data.interleave_shards=1"]), "after": (False, [])}
        results = {}
        for name, (keep, extra) in arms.items():
            m = write_shards(work / "train", work / f"shards-{name}", "labelled", templates=work / "captions.txt",
                             shard_size=a.per_class, keep_order=keep, seed=a.seed, progress=False)
            pattern = str(work / f"shards-{name}" / f"shard-{{000000..{len(m['shards']) - 1:06d}}}.tar")
            run = train_arm(name, pattern, work / f"run-{name}", a, extra)
            rows = run["rows"]
            results[name] = {
                "top1": zero_shot(work / f"run-{name}" / "model.safetensors", work / "test", classes),
                "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                "repeated": float(np.mean([r["data/repeated_captions"] for r in rows])),
                "diversity": float(np.mean([r["data/caption_diversity"] for r in rows if "data/caption_diversity" in r])),
                "warning": next((line for line in run["stderr"].splitlines() if "batches look degenerate" in line), ""),
                "interleave": extra[0].split("=")[1] if extra else str(defaults.interleave_shards),
                "seconds": run["seconds"]}
        print(f"# {len(classes)} drawn classes x {a.per_class} train / {a.test_per_class} test images (32 px JPEG), "
              f"{len(TEMPLATES)} training templates, tiny-vit, 1 process, {a.steps} steps x {a.batch}, "
              f"shuffle buffer {defaults.shuffle_buffer}, data.workers 1; {time.perf_counter() - t0:.0f} s"
              f" in all (drawing, writing, training, evaluation)")
        print(f"# ln(batch) = {np.log(a.batch):.3f}; zero-shot: CIFAR-10 prompt ensemble, chance = "
              f"{1 / len(classes):.1%}")
        print("# repeated: mean data/repeated_captions; diversity: mean data/caption_diversity (1 = a random batch)")
        print(f"{'arm':>7} {'shards':>12} {'interleave':>10} {'loss@10':>8} {'loss@end':>8} {'repeated':>8} "
              f"{'diversity':>9} {'warned':>6} {'train s':>7} {'top-1':>7}")
        for name, r in results.items():
            order = "source order" if name == "before" else "shuffled"
            print(f"{name:>7} {order:>12} {r['interleave']:>10} {r['loss_first']:>8.3f} {r['loss_last']:>8.3f} "
                  f"{r['repeated']:>8.2f} {r['diversity']:>9.2f} {str(bool(r['warning'])):>6} {r['seconds']:>7.0f} "
                  f"{r['top1']:>7.1%}")
        for name, r in results.items():
            if r["warning"]:
                print(f"# {name} warned: {r['warning']}")


if __name__ == "__main__":
    main()
