"""Step time and peak memory of contrastive-exact accumulation against one big batch and independent micro-batches.

Three ways to take one optimizer step on k x b samples per rank, each through the trainer's own `Engine` (DeepSpeed,
one process, ZeRO-0) and `vlpretrain.accumulate`:

  exact        k micro-batches of b, the loss over all k x b (cached features, replayed forward)
  big          one batch of k x b (the memory that exact accumulation avoids)
  independent  k micro-batches of b, each its own contrastive batch of b

    PYTHONPATH=. python benchmarks/accumulation.py [--model tiny-vit --batch 64 --k 4 --steps 8]

Memory: each mode alone in its own process, the peak resident set of its first full-size step above the resident
set just before it (activations, gradients, cached features); a step on 2-sample micro-batches runs first, so the
model and the optimizer state are already resident and not counted. Time: the three modes in one process taking
turns step by step, so that other load on shared cores hits them alike; the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


MODES = ("big", "exact", "independent")


class Setup:
    """One mode as the trainer builds it: model, DeepSpeed engine (one process, ZeRO-0), loss, accumulation."""

    def __init__(self, mode: str, a: argparse.Namespace, out: str):
        import torch

        from vlpretrain.accumulate import build_accumulation
        from vlpretrain.config import load_config
        from vlpretrain.engine import build_engine, init_distributed
        from vlpretrain.models import build_model
        from vlpretrain.objectives import build_objective

        self.k, b = (1, a.k * a.batch) if mode == "big" else (a.k, a.batch)
        cfg = load_config(None, ["data.train=synthetic", f"model.name={a.model}", f"data.batch_size={b}",
                                 f"train.grad_accum={self.k}", f"train.output_dir={out}", "train.warmup_steps=1",
                                 f"train.accumulation={'independent' if mode == 'independent' else 'exact'}"])
        env = init_distributed()
        torch.manual_seed(0)
        model = build_model(cfg.model)
        size = model.visual.image_size
        self.size, self.context = (size if isinstance(size, int) else size[0]), model.context_length
        self.accumulation = build_accumulation(build_engine(model, cfg, env), build_objective(cfg), cfg, env.device)
        self.g = torch.Generator().manual_seed(1)
        self.step(self.batches(2))  # allocates the optimizer state (the same in every mode) and warms up
        self.full = self.batches(b)

    def batches(self, n: int) -> list:
        import torch

        return [(torch.randn(n, 3, self.size, self.size, generator=self.g),
                 torch.randint(1, 49000, (n, self.context), generator=self.g)) for _ in range(self.k)]

    def step(self, batches: list | None = None) -> float:
        """Seconds of one optimizer step (its k micro-batches)."""
        batches = batches or self.full
        start = time.perf_counter()
        self.accumulation.step(batches, lambda loss: None)
        return time.perf_counter() - start


def _child(a: argparse.Namespace) -> None:
    """memory: one mode's first full step, alone in its process; time: all modes taking turns step by step, so that
    other load on shared cores hits them alike."""
    from vlpretrain.engine import shutdown_distributed

    with tempfile.TemporaryDirectory() as out:
        if a.child == "time":
            setups = {mode: Setup(mode, a, f"{out}/{mode}") for mode in MODES}
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            for i in range(a.warmup + a.steps):
                for mode, setup in setups.items():
                    t = setup.step()
                    if i >= a.warmup:
                        times[mode].append(t)
            result = {mode: statistics.median(ts) for mode, ts in times.items()}
        else:
            setup = Setup(a.child, a, out)
            before = _rss_mib()
            setup.step()
            # the first full step's peak above the resident set it started from: what the step itself needs
            result = {"peak_mib": _peak_mib(), "step_mib": max(_peak_mib() - before, 0.0)}
        shutdown_distributed()
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--batch", type=int, default=64, help="micro-batch size b")
    p.add_argument("--k", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", choices=[*MODES, "time"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    def child(which: str) -> dict:
        cmd = [sys.executable, __file__, "--child", which, "--model", a.model, "--batch", str(a.batch), "--k",
               str(a.k), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            sys.exit(f"{which} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = {mode: child(mode) for mode in MODES}
    for mode, seconds in child("time").items():
        rows[mode].update(step_s=seconds, samples=a.k * a.batch)
    base = rows["big"]
    contrastive = {"big": a.k * a.batch, "exact": a.k * a.batch, "independent": a.batch}
    print(f"{a.model}, {a.k} x {a.batch} samples per optimizer step, one process, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':<12} {'contrastive':>11} {'step s':>8} {'samples/s':>10} {'time':>6} {'step MiB':>9} {'memory':>7}"
          f" {'peak MiB':>9}")
    for mode, r in rows.items():
        print(f"{mode:<12} {contrastive[mode]:>11} {r['step_s']:>8.3f} {r['samples'] / r['step_s']:>10.0f} "
              f"{r['step_s'] / base['step_s']:>5.2f}x {r['step_mib']:>9.0f} "
              f"{r['step_mib'] / max(base['step_mib'], 1e-9):>6.2f}x {r['peak_mib']:>9.0f}")
    print("time and memory relative to one batch of k x b (big); step MiB: peak resident set of a step above the "
          "resident set before it")


if __name__ == "__main__":
    main()
