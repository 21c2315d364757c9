"""Images/s per loader worker at 224 px on JPEG shards: vlpretrain's loader against a plain webdataset pipeline.

Both read the same shards with the same open_clip train transform and tokenizer, the same batch size, shuffle
buffer and DataLoader worker count; the ratio is ours / plain. Ours runs with each `data.interleave_shards` of
`--interleave` (the plain pipeline reads shards one after another), so the cost of interleaving shows as the ratio
of the first to the others. Synthetic photo-like JPEGs (smooth colour fields with grain) are written once into a
temporary folder.

    python benchmarks/loader_throughput.py [--images 2000] [--width 400 --height 300] [--workers 1 2] \
        [--interleave 1 4]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, stages, write_shards
from vlpretrain.data.stats import WorkerStats


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


def measure(loader) -> tuple[float, int]:
    """Images/s after the first batch (worker start-up and shuffle-buffer fill excluded), and images seen."""
    it = iter(loader)
    first, _ = next(it)
    start, n = time.perf_counter(), 0
    for images, tokens in it:
        assert images.shape[1:] == (3, 224, 224) and tokens.ndim == 2
        n += images.shape[0]
    return n / (time.perf_counter() - start), n + first.shape[0]


def read_rate(urls: list[str], interleave: int, repeats: int) -> float:
    """Raw samples/s of the shard-reading stage alone (no decode): where interleaving spends its time."""
    best = 0.0
    for r in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in stages.read_shards([(u, r) for u in urls], WorkerStats(), {}, interleave,
                                              random.Random(r)))
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--interleave", type=int, nargs="+", default=[1, 4], help="data.interleave_shards values to time")
    p.add_argument("--repeats", type=int, default=6, help="best of this many alternating runs per configuration")
    a = p.parse_args()
    torch.set_num_threads(1)

    transform = open_clip.image_transform(224, is_train=True, aug_cfg={"scale": (0.9, 1.0)})
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "src", a.images, a.width, a.height)
        shards = max(a.workers) * 4
        m = write_shards(Path(tmp) / "src", Path(tmp) / "shards", prefix="bench", progress=False,
                         shard_size=-(-a.images // shards))
        pattern = str(Path(tmp) / "shards" / f"bench-{{000000..{len(m['shards']) - 1:06d}}}.tar")
        mb = sum(s["bytes"] for s in m["shards"]) / 2**20
        print(f"# {a.images} JPEGs {a.width}x{a.height} in {len(m['shards'])} shards ({mb:.0f} MiB), 224 px, "
              f"batch {a.batch}, shuffle buffer {a.buffer}, {os.cpu_count()} CPUs, torch threads 1")
        first = a.interleave[0]
        urls = [str(Path(tmp) / "shards" / s["name"]) for s in m["shards"]]
        rates = {k: read_rate(urls, k, a.repeats) for k in a.interleave}
        print("# shard reading alone (tar members to raw samples, no decode), one process: samples/s")
        print("  " + "  ".join(f"interleave {k}: {v:,.0f}" + (f" ({v / rates[first]:.2f}x)" if k != first else "")
                               for k, v in rates.items()))
        header = [f"interleave {k}" for k in a.interleave] + ["webdataset"] + \
            [f"i{k}/plain" for k in a.interleave] + [f"i{k}/i{first}" for k in a.interleave[1:]]
        print("# images/s per worker, then ratios")
        print(f"{'workers':>7} " + " ".join(f"{h:>13}" for h in header))
        for w in a.workers:
            ours: dict[int, list[float]] = {k: [] for k in a.interleave}
            plain = []
            configs: list[int | None] = [*a.interleave, None]  # None: plain webdataset
            for r in range(a.repeats):
                # alternating, and rotated each round: load from other processes and the previous loader's
                # shutdown must not favour the configuration that happens to run in one place of the round
                for k in configs[r % len(configs):] + configs[:r % len(configs)]:
                    if k is None:
                        plain.append(measure(plain_webdataset(pattern, transform, tokenizer, a.batch, w, a.buffer))[0])
                        continue
                    cfg = DataConfig(train=pattern, batch_size=a.batch, workers=w, shuffle_buffer=a.buffer,
                                     interleave_shards=k)
                    ours[k].append(measure(build_loader(cfg, transform, tokenizer, rank=0, world_size=1))[0])
            best = {k: max(v) for k, v in ours.items()}
            best_plain = max(plain)
            row = [best[k] / w for k in a.interleave] + [best_plain / w]
            ratios = [best[k] / best_plain for k in a.interleave] + [best[k] / best[first] for k in a.interleave[1:]]
            print(f"{w:>7} " + " ".join(f"{v:>13.1f}" for v in row) + " " + " ".join(f"{v:>13.2f}" for v in ratios))


if __name__ == "__main__":
    main()
