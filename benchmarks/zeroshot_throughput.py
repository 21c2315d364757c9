"""Images/s of `zeroshot.evaluate` against a plain loop (model + DataLoader + matmul) on the same model and data.

    PYTHONPATH=. python benchmarks/zeroshot_throughput.py [--model tiny-vit] [--images 2000] [--device cpu]

Writes a CIFAR-10-like test batch (python pickle, random-shape drawings) to a temporary folder, then times:
  plain     the images decoded once from the pickle into a torch Dataset, open_clip preprocessing, DataLoader,
            encode_image, normalise, matmul with a head built beforehand, argmax (head time excluded)
  evaluate  zeroshot.evaluate(model, "cifar10", root): layout detection, loading, head from 18 templates x 10
            classes, features, metrics
  cached    the same with the head read from zeroshot's disk cache
Each is run `--repeats` times, alternating, and the best time is kept (other processes share these cores).
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import zeroshot
from vlpretrain.models import build_model, get_tokenizer, image_transform


def write_fake_cifar(root: Path, n: int, seed: int = 0) -> None:
    """A cifar-10-batches-py/test_batch of n 32x32 images: coloured rectangles on noise, labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    for i, y in enumerate(labels):
        x0, y0 = rng.integers(0, 16, size=2)
        images[i, y0:y0 + 16, x0:x0 + 16] = (25 * y, 255 - 25 * y, 128)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    (root / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
    batch = {b"labels": labels.tolist(), b"data": data, b"batch_label": b"fake"}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch))


class PlainCifar(Dataset):
    def __init__(self, path: Path, transform):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        self.images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.labels = batch[b"labels"]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def plain_loop(model, head, dataset, batch_size, workers, device) -> float:
    """Top-1 accuracy of the head over the dataset, the way one writes it by hand."""
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            feats = F.normalize(model.encode_image(x.to(device)), dim=-1)
            correct += (feats @ head).argmax(dim=1).cpu().eq(y).sum().item()
    return correct / len(dataset)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-vit", help="architecture (random weights)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build_model(a.model).to(device).eval()
    tokenizer = get_tokenizer(a.model)
    transform = image_transform(model, train=False)
    bench = zeroshot.get_benchmark("cifar10")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fake_cifar(root, a.images)
        head = zeroshot.build_classifier(model, tokenizer, bench.classnames, bench.templates, device=device)
        plain_data = PlainCifar(root / "cifar-10-batches-py" / "test_batch", transform)
        cache = root / "heads"
        zeroshot.build_classifier(model, tokenizer, bench.classnames, bench.templates, device=device, cache_dir=cache)
        runs = {
            "plain": lambda: plain_loop(model, head, plain_data, a.batch_size, a.workers, device),
            "evaluate": lambda: zeroshot.evaluate(model, "cifar10", root, tokenizer=tokenizer,
                                                  batch_size=a.batch_size, workers=a.workers, device=device,
                                                  progress=False)["top1"],
            "cached": lambda: zeroshot.evaluate(model, "cifar10", root, tokenizer=tokenizer, batch_size=a.batch_size,
                                                workers=a.workers, device=device, progress=False,
                                                cache_dir=cache)["top1"],
        }
        best: dict[str, float] = {}
        top1: dict[str, float] = {}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                top1[name] = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"model {a.model} (random weights), {a.images} fake CIFAR images at {transform.transforms[0].size}px, "
          f"batch {a.batch_size}, workers {a.workers}, device {device} ({dev}), torch threads "
          f"{torch.get_num_threads()}, best of {a.repeats}")
    for name in runs:
        print(f"  {name:<9} {a.images / best[name]:9.1f} images/s   ({best[name]:.2f} s, top-1 {top1[name]:.4f})")
    print(f"  ratio evaluate/plain {best['plain'] / best['evaluate']:.2f}   cached/plain "
          f"{best['plain'] / best['cached']:.2f}   (1.00 = as fast as the plain loop)")
    # the same predictions up to float rounding on near-ties (the two paths multiply on different devices)
    assert abs(top1["plain"] - top1["evaluate"]) <= 0.005, "evaluate and the plain loop disagree"


if __name__ == "__main__":
    main()
