"""Few-shot top-1 on a benchmark's test split: zero-shot head, linear probe and the adapted heads of `zeroshot adapt`.

The default benchmark is one where zero-shot is weak, as the demo model is on CIFAR-10 (issue 26): the demo model
(trained on Fashion-MNIST captions) on scikit-learn's 8x8 handwritten digits, scaled to 28 px (bilinear) and written
as the `mnist` benchmark's idx files (per class, a seeded 50 images for train, the other 1,297 images for test).
Its text tower never learned the digit class names, so its zero-shot head is near chance.

Image features are extracted once into the feature cache (shared by every method, as in `zeroshot adapt` and
`zeroshot probe`), so each fit time is the method's own work on cached features: building the zero-shot head, an
adaptation run (early stopping, then a refit on all shots), or a probe fit (its l2 swept on held-out shots; at one
shot there is nothing to hold out, so the probe uses a fixed l2). The adapted methods train on `--augment` views per
shot (cropped views, features cached once: the first run at each k includes encoding them); the probe keeps the CLIP
paper's protocol, one unaugmented feature per image. `--methods` picks the adapted methods; `linear@0` is the linear
head without views, so the table shows what the views alone bring.

    PYTHONPATH=. python benchmarks/fewshot.py --model runs/demo/model.safetensors        # digits as mnist, k = 1..16
    PYTHONPATH=. python benchmarks/fewshot.py --model M --benchmark fashion-mnist --root /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import zeroshot
from vlpretrain.models import load_model
from zeroshot.classifier import build_classifier
from zeroshot.fewshot import AdaptConfig, adapt
from zeroshot.probe import linear_probe, split_features


def write_digits(root: Path) -> Path:
    """scikit-learn's 8x8 digits as `mnist` idx files in `root` (28 px; 50 train images per class, the rest test)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels = (digits.images / 16 * 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR)) for im in pixels])
    rng = np.random.default_rng(0)
    train: list[int] = []
    for c in range(10):
        train += rng.permutation(np.flatnonzero(digits.target == c))[:50].tolist()
    test = sorted(set(range(len(images))) - set(train))
    for prefix, rows in (("train", sorted(train)), ("t10k", test)):
        x, y = images[rows], digits.target[rows].astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(y)) + y.tobytes())
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/model.safetensors", help="exported model (or architecture name)")
    p.add_argument("--benchmark", default="mnist")
    p.add_argument("--root", help="the benchmark's folder (default: scikit-learn's digits written as mnist)")
    p.add_argument("--shots", default="1,2,4,8,16", help="comma-separated k")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the shots; figures are their mean")
    p.add_argument("--max-images", type=int, help="cap each split at this many evenly spaced images")
    p.add_argument("--cache-dir", help="feature cache (default: a temporary folder)")
    p.add_argument("--probe-l2", type=float, default=1.0, help="the probe's fixed l2 at one shot")
    p.add_argument("--steps", type=int, default=AdaptConfig().steps, help="adaptation's most steps")
    p.add_argument("--augment", type=int, help="views per shot for adapted methods (default: each method's)")
    p.add_argument("--methods", default="prompt,ia3,tip,linear,linear@0",
                   help="adapted methods, METHOD or METHOD@VIEWS (views per shot instead of --augment)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cache = a.cache_dir or tempfile.mkdtemp(prefix="fewshot-features-")
    if a.root is None:
        a.root = str(write_digits(Path(tempfile.mkdtemp(prefix="fewshot-digits-"))))
    shots = [int(k) for k in a.shots.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]

    model = load_model(a.model)
    bench = zeroshot.get_benchmark(a.benchmark)
    t = time.perf_counter()
    features = split_features(model, bench, a.root, ("train", "test"), max_images=a.max_images, cache_dir=cache)
    extract = time.perf_counter() - t
    (train_x, _), (test_x, test_y) = features["train"], features["test"]
    print(f"{a.benchmark}: {len(train_x)} train / {len(test_x)} test images, features extracted once in "
          f"{extract:.1f} s; {torch.get_num_threads()} threads", flush=True)

    t = time.perf_counter()
    head = build_classifier(model, None, bench.classnames, bench.templates)
    zs_time = time.perf_counter() - t
    zs_top1 = float(((F.normalize(test_x, dim=-1) @ head).argmax(1) == test_y).float().mean())

    methods = [(m, int(v) if v else a.augment) for m, _, v in (x.partition("@") for x in a.methods.split(","))]
    rows: list[tuple[int, str, float, float, str]] = []
    for k in shots:
        rows.append((k, "zero-shot", zs_top1, zs_time, "no labels"))
        runs: dict[str, list[tuple[float, float, str]]] = {"linear probe": []}
        for seed in seeds:
            for method, views in methods:
                cfg = AdaptConfig(steps=a.steps, augment=views)
                views = cfg.views_for(method)
                t = time.perf_counter()
                r = adapt(model, a.benchmark, a.root, shots=k, method=method, config=cfg, seed=seed,
                          max_images=a.max_images, cache_dir=cache)
                if method == "tip":
                    note = f"alpha={r.adapter.tensors['alpha'].item():.3g}, beta={r.adapter.tensors['beta'].item():.3g}"
                elif method == "linear":
                    l2 = r.adapter.info["l2"]
                    note = f"l2={l2}" if l2 == "clap" else f"l2={float(l2):.3g}"
                else:
                    note = f"{int(r.metrics['steps'])} steps"
                runs.setdefault(f"{method} ({views} views)", []).append((r.metrics["top1"], time.perf_counter() - t,
                                                                        note))
            t = time.perf_counter()
            m = linear_probe(model, a.benchmark, a.root, shots=k, l2=a.probe_l2 if k < 2 else None, seed=seed,
                             max_images=a.max_images, cache_dir=cache)
            runs["linear probe"].append((m["top1"], time.perf_counter() - t, f"l2={m['l2']:.3g}"))
        for name, got in runs.items():
            rows.append((k, name, statistics.mean(g[0] for g in got), statistics.mean(g[1] for g in got),
                         ", ".join(g[2] for g in got)))
        print(f"k={k} done", flush=True)

    print(f"\n{a.model} on {a.benchmark} test ({len(test_x)} images), mean over seeds {a.seeds}\n")
    print("| k | method | top-1 (%) | fit time (s) | chosen |")
    print("|---:|---|---:|---:|---|")
    for k, name, top1, secs, note in rows:
        print(f"| {k} | {name} | {100 * top1:.1f} | {secs:.2f} | {note} |")


if __name__ == "__main__":
    main()
