"""Images/s per loader worker at 224 px on JPEG shards: vlpretrain's loader against a plain webdataset pipeline.

Both read the same shards with the same open_clip train transform and tokenizer, the same batch size, shuffle
buffer and DataLoader worker count, and both are timed up to the batch the training step feeds the model: plain
webdataset's float batches cast to the training dtype on the device, ours with the uint8 batches normalised there
(`loader.normalize`, timed too: on the CPU here). Each row is one image size and worker count; ours runs as
configured by default and with `data.fast_decode` / `data.uint8_batches` turned off (both off is the loader before
them), so each option's effect shows beside the peer. The shard-reading stage alone is timed for each
`--interleave` value first. Synthetic photo-like JPEGs (smooth colour fields with grain) are written once into a
temporary folder per size.

    python benchmarks/loader_throughput.py [--images 2000] [--sizes 400x300 1024x768] [--workers 1 2] \
        [--interleave 1 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, stages, write_shards
from vlpretrain.data.stats import WorkerStats

# (label, data.fast_decode, data.uint8_batches); None: plain webdataset
VARIANTS: list[tuple[str, bool, bool] | None] = [("ours", True, True), ("uint8 only", False, True),
                                                 ("both off", False, False), None]


def make_jpegs(folder: Path, n: int, width: int, height: int) -> None:
    """Photo-like JPEGs (a smooth random colour field plus grain, ~quality 90) with a caption beside each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 3))
        pixels = np.clip(np.asarray(small, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a synthetic picture number {i}")


def plain_webdataset(pattern: str, transform, tokenizer, batch: int, workers: int, buffer: int):
    """The textbook webdataset pipeline with the same transform, tokenizer and batching."""
    def tokenize(sample):
        images, texts = sample
        return images, tokenizer(list(texts))

    ds = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=wds.single_node_only,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .shuffle(buffer).decode("pil").to_tuple("jpg", "txt").map_tuple(transform, lambda t: t)
          .batched(batch, partial=False).map(tokenize))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def touch(images: torch.Tensor) -> float:
    """Read one value per 4 KiB page: the forward pass reads every pixel, and a batch that came through shared
    memory is paged into this process on that first read, which both pipelines must pay alike."""
    return float(images.reshape(-1)[:: 4096 // images.element_size()].sum())


def measure(loader, to_model: Callable[[torch.Tensor], torch.Tensor], size: int) -> float:
    """Images/s up to model-ready batches, after the first batch (worker start-up and shuffle fill excluded)."""
    it = iter(loader)
    touch(to_model(next(it)[0]))
    start, n = time.perf_counter(), 0
    for images, tokens in it:
        x = to_model(images)
        assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32 and tokens.ndim == 2
        touch(x)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def read_rate(urls: list[str], interleave: int, repeats: int) -> float:
    """Raw samples/s of the shard-reading stage alone (no decode): where interleaving spends its time."""
    best = 0.0
    for r in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in stages.read_shards([(u, r) for u in urls], WorkerStats(), {}, interleave,
                                              random.Random(r)))
        best = max(best, n / (time.perf_counter() - start))
    return best


def normalize_cost(loader, device: torch.device, batch: int, size: int, repeats: int) -> float:
    """Milliseconds of `loader.normalize` on one uint8 batch on `device` (best of `repeats`)."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = loader.normalize(images, torch.float32)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del out
    return 1e3 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="JPEGs per size")
    p.add_argument("--sizes", nargs="+", default=["400x300", "1024x768"], help="JPEG sizes, WIDTHxHEIGHT")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--size", type=int, default=224, help="model input resolution")
    p.add_argument("--interleave", type=int, nargs="+", default=[1, 4],
                   help="data.interleave_shards values whose shard reading is timed; the loader runs the last")
    p.add_argument("--repeats", type=int, default=3, help="best of this many rotated rounds per configuration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(a.device)

    transform = open_clip.image_transform(a.size, is_train=True, aug_cfg={"scale": (0.9, 1.0)})
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    shards = max(a.workers) * 4
    print(f"# {a.images} JPEGs per size in {shards} shards, {a.size} px, batch {a.batch}, shuffle buffer {a.buffer}, "
          f"data.interleave_shards {a.interleave[-1]}, {os.cpu_count()} CPUs, torch threads 1, device {device}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, best of {a.repeats}")
    labels = [v[0] if v else "webdataset" for v in VARIANTS]
    header = f"{'size':>9} {'workers':>7} " + " ".join(f"{h:>11}" for h in labels) + \
        f" {'ours/plain':>11} {'off/plain':>11}"
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.sizes:
            width, height = (int(v) for v in spec.split("x"))
            make_jpegs(Path(tmp) / spec / "src", a.images, width, height)
            m = write_shards(Path(tmp) / spec / "src", Path(tmp) / spec / "shards", prefix="bench", progress=False,
                             shard_size=-(-a.images // shards))
            pattern = str(Path(tmp) / spec / "shards" / f"bench-{{000000..{len(m['shards']) - 1:06d}}}.tar")
            if spec == a.sizes[0]:
                urls = [str(Path(tmp) / spec / "shards" / s["name"]) for s in m["shards"]]
                rates = {k: read_rate(urls, k, a.repeats) for k in a.interleave}
                first = a.interleave[0]
                print(f"# shard reading alone at {spec} (tar members to raw samples, no decode), one process: "
                      "samples/s")
                print("  " + "  ".join(f"interleave {k}: {v:,.0f}" +
                                       (f" ({v / rates[first]:.2f}x)" if k != first else "") for k, v in rates.items()))
                probe = build_loader(DataConfig(train=pattern, batch_size=a.batch), transform, tokenizer, rank=0,
                                     world_size=1, defer_normalize=True)
                print(f"# loader.normalize of one uint8 batch on {device}: "
                      f"{normalize_cost(probe, device, a.batch, a.size, 5):.1f} ms (included in ours below)")
                print("# images/s per worker, then ratios (off: both options off, the loader before them)")
                print(header, flush=True)
            for w in a.workers:
                got: dict[str, list[float]] = {label: [] for label in labels}
                for r in range(a.repeats):
                    # rotated each round: load from other processes and the previous loader's shutdown must not
                    # favour the configuration that happens to run in one place of the round
                    for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                        if v is None:
                            loader = plain_webdataset(pattern, transform, tokenizer, a.batch, w, a.buffer)
                            got["webdataset"].append(measure(loader, lambda x: x.to(device, torch.float32), a.size))
                            continue
                        label, fast, uint8 = v
                        cfg = DataConfig(train=pattern, batch_size=a.batch, workers=w, shuffle_buffer=a.buffer,
                                         interleave_shards=a.interleave[-1], fast_decode=fast, uint8_batches=uint8)
                        ours = build_loader(cfg, transform, tokenizer, rank=0, world_size=1, defer_normalize=True)
                        got[label].append(measure(
                            ours, lambda x, ld=ours: ld.normalize(x.to(device, non_blocking=True), torch.float32),
                            a.size))
                best = {k: max(v) / w for k, v in got.items()}
                row = f"{spec:>9} {w:>7} " + " ".join(f"{best[k]:>11.1f}" for k in labels) + \
                    f" {best['ours'] / best['webdataset']:>10.2f}x {best['both off'] / best['webdataset']:>10.2f}x"
                print(row, flush=True)
    print(f"# load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
