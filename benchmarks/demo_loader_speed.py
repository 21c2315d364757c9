"""Training samples/s of the demo run with the loader's uint8 pixel path on and off, alternating, in one invocation.

Each run is `vlpretrain train configs/demo.yaml` in its own process, on the given shards, with one process, ZeRO-0,
no evaluation and `--steps` steps; the variants differ only in `data.fast_decode` / `data.uint8_batches`. Prints the
median samples/s of each run's metric lines after `--warmup` steps and the best run of each variant, and the ratio.
Write Fashion-MNIST shards once with `vlpretrain make-shards` (see the README's demo section).

    python benchmarks/demo_loader_speed.py --shards '/tmp/fm/fmnist-{000000..000011}.tar' [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (label, data.fast_decode, data.uint8_batches)
VARIANTS = [("off (PIL, float batches)", False, False), ("on (uint8 path)", True, True)]


def run(shards: str, steps: int, warmup: int, workers: int, fast: bool, uint8: bool) -> float:
    """Median samples/s after `warmup` steps of one training run in a child process."""
    with tempfile.TemporaryDirectory() as out:
        sets = [f"data.train={shards}", f"train.steps={steps}", "train.zero_stage=0", f"train.output_dir={out}",
                "train.log_every=1", "train.progress=false", "train.report_to=[]", "eval.benchmarks=[]",
                "eval.linear_probe=false", "eval.at_end=false", "train.warmup_steps=10", f"data.workers={workers}",
                f"data.fast_decode={str(fast).lower()}", f"data.uint8_batches={str(uint8).lower()}"]
        cmd = [sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
               *[a for s in sets for a in ("--set", s)]]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"training run failed:\n{(r.stdout + r.stderr)[-3000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        rates = [row["samples_per_s"] for row in rows if "samples_per_s" in row and row["step"] > warmup]
        return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="Fashion-MNIST shard pattern written by make-shards")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of each run's median")
    p.add_argument("--workers", type=int, default=1, help="data.workers")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best run of each variant counts")
    a = p.parse_args()
    print(f"# configs/demo.yaml, one process, ZeRO-0, {a.steps} steps (median after {a.warmup}), data.workers "
          f"{a.workers}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    got: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
    for r in range(a.rounds):
        for label, fast, uint8 in VARIANTS[r % 2:] + VARIANTS[:r % 2]:  # alternate which goes first
            got[label].append(run(a.shards, a.steps, a.warmup, a.workers, fast, uint8))
            print(f"  round {r}: {label:26s} {got[label][-1]:8.1f} samples/s", flush=True)
    best = {k: max(v) for k, v in got.items()}
    for label, rate in best.items():
        print(f"{label:26s} {rate:8.1f} samples/s (best of {a.rounds})")
    off, on = (best[label] for label, _, _ in VARIANTS)
    print(f"{'ratio on/off':26s} {on / off:8.2f}x   load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
