"""Time from start to the first batch on foreign shards (img2dataset's layout), and the header-scan rate without
sidecars, so the growth with shard count shows.

Each row starts a fresh Python process that builds the loader for `--shards N` shards of img2dataset's layout
(`00000.tar` + `00000_stats.json`, 5-digit names) and takes one batch, the way `vlpretrain train` starts on rank 0:
imports, counting (sidecars read concurrently), planning the epoch, the first batch. The shards are hard links of
one small shard, so thousands of them cost no disk; only their count matters to the start-up. The scan rows time a
header scan of a real 10,000-sample shard (img2dataset's default size) serially and with `index-shards` over
`--workers` processes; the figure for 41,408 shards (LAION-400M) is extrapolated from the measured rates, and the
start-up for 41,408 shards with sidecars is measured directly as its own row.

    python benchmarks/startup.py [--shards 100 1000 10000 41408] [--scan-samples 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

LAION_400M_SHARDS = 41_408

FIRST_BATCH = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, count_shards_of
t1 = time.perf_counter()
cfg = DataConfig(train=sys.argv[1], batch_size=8, workers=1, shuffle_buffer=100, augment=False)
counts = count_shards_of(cfg)
t2 = time.perf_counter()
loader = build_loader(cfg, lambda im: torch.zeros(3, 8, 8), lambda caps: torch.zeros(len(caps), 4, dtype=torch.long),
                      rank=0, world_size=1, counts=counts)
next(iter(loader))
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "count": t2 - t1, "plan_and_first_batch": t3 - t2, "total": t3 - t0,
                  "how": counts.how}))
"""


def write_shard(path: Path, samples: int) -> None:
    """A shard of `samples` samples, each a small JPEG, a caption and img2dataset's json."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    jpg = buf.getvalue()
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"{i:09d}"
            for ext, data in (("jpg", jpg), ("txt", f"a photo number {i}".encode()),
                              ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def img2dataset_folder(root: Path, template: Path, n: int, samples: int) -> str:
    """`n` hard links of `template` named like img2dataset's output, each with its stats sidecar."""
    root.mkdir(parents=True)
    stats = json.dumps({"count": samples, "successes": samples, "failed_to_download": 0})
    for s in range(n):
        os.link(template, root / f"{s:05d}.tar")
        (root / f"{s:05d}_stats.json").write_text(stats)
    return str(root / f"{{00000..{n - 1:05d}}}.tar")


def first_batch(pattern: str) -> dict:
    r = subprocess.run([sys.executable, "-c", FIRST_BATCH, pattern], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000, LAION_400M_SHARDS])
    p.add_argument("--scan-samples", type=int, default=10000, help="samples in the shard the scan rows read")
    p.add_argument("--workers", type=int, default=2, help="index-shards processes for the parallel scan row")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = root / "template.tar"
        write_shard(template, 16)
        print(f"start to first batch, img2dataset layout with stats sidecars (fresh process; {os.cpu_count()} cores)")
        print(f"{'shards':>8} {'imports s':>10} {'count s':>8} {'plan+batch s':>13} {'total s':>8}  counted by")
        rows = []
        for n in a.shards:
            r = first_batch(img2dataset_folder(root / f"n{n}", template, n, 16))
            rows.append((n, r))
            print(f"{n:>8,} {r['imports']:>10.2f} {r['count']:>8.2f} {r['plan_and_first_batch']:>13.2f} "
                  f"{r['total']:>8.2f}  {r['how']}")
        if len(rows) >= 2:  # imports are a constant of the machine, not of the data: growth is in the rest
            (n0, r0), (n1, r1) = rows[0], rows[-1]
            work0, work1 = (r["count"] + r["plan_and_first_batch"] for r in (r0, r1))
            per = (work1 - work0) / (n1 - n0)
            print(f"growth after imports: {per * 1e3:.3f} ms per shard; at {LAION_400M_SHARDS:,} shards: "
                  f"{work0 + per * (LAION_400M_SHARDS - n0):.1f} s + imports (linear from {n0:,} and {n1:,} shards)")

        big = root / "scan" / "00000.tar"
        big.parent.mkdir()
        write_shard(big, a.scan_samples)
        from vlpretrain.data import index_shards
        from vlpretrain.data.tars import scan

        t = time.perf_counter()
        n, clean = scan(str(big))
        serial = time.perf_counter() - t
        assert n == a.scan_samples and clean
        copies = 8 * a.workers  # enough that the workers' start-up (imports) is spread thin
        for s in range(1, copies):
            os.link(big, big.parent / f"{s:05d}.tar")
        t = time.perf_counter()
        index_shards(str(big.parent), workers=a.workers)
        parallel = (time.perf_counter() - t) / copies
        print(f"\nheader scan without sidecars, {a.scan_samples:,}-sample shard "
              f"({big.stat().st_size / 1e6:.0f} MB, {3 * a.scan_samples:,} members)")
        print(f"  one process: {serial:.2f} s per shard -> {LAION_400M_SHARDS:,} shards: "
              f"{serial * LAION_400M_SHARDS / 3600:.1f} h")
        print(f"  index-shards --workers {a.workers} ({copies} shards, process start-up included): "
              f"{parallel:.2f} s per shard -> {LAION_400M_SHARDS:,} shards: "
              f"{parallel * LAION_400M_SHARDS / 3600:.1f} h, once; every run after reads the index")


if __name__ == "__main__":
    main()
