"""Images/s of `zeroshot.evaluate` against a plain loop (model + DataLoader + matmul) on the same model and data,
and (images + texts)/s of `zeroshot.retrieval` against a plain retrieval loop.

    PYTHONPATH=. python benchmarks/zeroshot_throughput.py [--model tiny-vit] [--images 2000] [--device cpu]
        [--case classification|retrieval|both]

Writes a CIFAR-10-like test batch (python pickle, random-shape drawings) to a temporary folder, then times:
  plain     the images decoded once from the pickle into a torch Dataset, open_clip preprocessing, DataLoader,
            encode_image, normalise, matmul with a head built beforehand, argmax (head time excluded)
  evaluate  zeroshot.evaluate(model, "cifar10", root): layout detection, loading, head from 18 templates x 10
            classes, features, metrics
  cached    the same with the head read from zeroshot's disk cache
Retrieval (`--case retrieval`): a CLIP_benchmark-style webdataset export of `--images` random-shape PNGs with
`--captions` templated captions each, then times:
  plain      images decoded from the tars once into a Dataset, DataLoader + encode_image, captions tokenized and
             encoded in batches, the full text x image similarity matrix, topk for recall@1/5/10 both ways
  retrieval  zeroshot.retrieval(model, "captions", root): layout detection, indexing, encoding, blocked ranking
Each is run `--repeats` times, alternating, and the best time is kept (other processes share these cores).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import platform
import tarfile
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


SHAPES = ["square", "circle", "cross", "bar", "dot"]
COLOURS = ["red", "green", "blue", "yellow", "white"]


def write_fake_captions(root: Path, n: int, per_image: int, seed: int = 0) -> list[list[str]]:
    """A CLIP_benchmark retrieval export: test/0.tar of n 64x64 PNGs with `per_image` templated captions each."""
    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    captions = []
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            image = rng.integers(0, 60, size=(64, 64, 3), dtype=np.uint8)
            x0, y0 = rng.integers(0, 32, size=2)
            colour, shape = int(rng.integers(0, 5)), int(rng.integers(0, 5))
            image[y0:y0 + 8 * (shape + 1), x0:x0 + 32] = (50 * colour, 255 - 50 * colour, 40 * shape)
            caps = [f"{t} {COLOURS[colour]} {SHAPES[shape]} number {i}" for t in
                    ("a photo of a", "a picture of the", "an image showing a", "a drawing of a", "the")[:per_image]]
            captions.append(caps)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            for name, data in ((f"s{i:07d}.png", buf.getvalue()), (f"s{i:07d}.txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    return captions


class PlainTarImages(Dataset):
    def __init__(self, shard: Path, transform):
        with tarfile.open(shard) as tar:
            self.images = [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                           for m in tar.getmembers() if m.name.endswith(".png")]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i


def plain_retrieval(model, tokenizer, dataset, captions, batch_size, workers, device) -> float:
    """Mean of recall@1/5/10 both ways, written by hand: full similarity matrix and topk."""
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    with torch.no_grad():
        img = torch.cat([F.normalize(model.encode_image(x.to(device)), dim=-1).cpu()
                         for x, _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers)])
        txt = torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)), dim=-1).cpu()
                         for i in range(0, len(texts), batch_size)])
    scores = txt @ img.T
    recalls = []
    for k in (1, 5, 10):
        recalls.append((scores.topk(k, dim=1).indices == owner[:, None]).any(1).float().mean().item())
        top_texts = scores.T.topk(k, dim=1).indices
        recalls.append((owner[top_texts] == torch.arange(len(img))[:, None]).any(1).float().mean().item())
    return sum(recalls) / len(recalls)


def time_runs(runs: dict, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time and last result of each run, alternating between them `repeats` times."""
    best: dict[str, float] = {}
    result: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            result[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return best, result


def retrieval_case(a: argparse.Namespace, model, tokenizer, transform, device: torch.device, dev: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captions = write_fake_captions(root, a.images, a.captions)
        plain_data = PlainTarImages(root / "test" / "0.tar", transform)
        runs = {
            "plain": lambda: plain_retrieval(model, tokenizer, plain_data, captions, a.batch_size, a.workers, device),
            "retrieval": lambda: zeroshot.retrieval(model, "captions", root, tokenizer=tokenizer,
                                                    batch_size=a.batch_size, workers=a.workers, device=device,
                                                    progress=False)["mean_recall"],
        }
        best, recall = time_runs(runs, a.repeats, device)
    items = a.images * (1 + a.captions)
    print(f"retrieval: {a.images} fake images x {a.captions} captions, batch {a.batch_size}, workers {a.workers}, "
          f"device {device} ({dev}), best of {a.repeats}")
    for name in runs:
        print(f"  {name:<9} {items / best[name]:9.1f} images+texts/s   ({best[name]:.2f} s, mean recall "
              f"{recall[name]:.4f})")
    print(f"  ratio retrieval/plain {best['plain'] / best['retrieval']:.2f}   (1.00 = as fast as the plain loop)")
    # topk breaks ties by position, we count them against the query: equal only up to ties of random features
    assert abs(recall["plain"] - recall["retrieval"]) <= 0.01, "retrieval and the plain loop disagree"


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
    p.add_argument("--case", choices=("classification", "retrieval", "both"), default="both")
    p.add_argument("--captions", type=int, default=5, help="captions per image in the retrieval case")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build_model(a.model).to(device).eval()
    tokenizer = get_tokenizer(a.model)
    transform = image_transform(model, train=False)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    if a.case in ("retrieval", "both"):
        retrieval_case(a, model, tokenizer, transform, device, dev)
    if a.case == "retrieval":
        return
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
        best, top1 = time_runs(runs, a.repeats, device)
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
