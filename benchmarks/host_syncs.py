"""Host reads of device values per training step, by configuration: ours against DeepSpeed's, in one invocation.

Runs tests/host_sync_probe.py (9 steps, logging every 4th) for each configuration and prints, per non-logging
step (the median over steps 2-9; step 1 holds one-time set-up), the Python-level host reads (`.item()`, `.tolist()`, `.cpu()`, number conversions) made by vlpretrain and by
DeepSpeed, and on a GPU every synchronising CUDA call torch's sync debug mode reports. On a GPU each one makes the
CPU wait until the device has drained its queue.

    python benchmarks/host_syncs.py                 # CPU: the Python-level reads
    DS_ACCELERATOR=cuda python benchmarks/host_syncs.py --batch-size 32
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
CONFIGS = {
    "fp32 ZeRO-0": ["train.precision=fp32"],
    "bf16 (ZeRO-1 BF16_Optimizer)": ["train.precision=bf16"],
    "fp32 ZeRO-2": ["train.precision=fp32", "train.zero_stage=2"],
    "bf16 ZeRO-3": ["train.precision=bf16", "train.zero_stage=3"],
    "exact accumulation x2": ["train.precision=fp32", "train.grad_accum=2"],
    "MoE 4 experts, both towers": ["train.precision=fp32", "model.moe.num_experts=4", "model.moe.towers=both"],
}


def probe(overrides: list[str], batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, str(REPO / "tests" / "host_sync_probe.py"), f"{out}/run",
                            f"data.batch_size={batch_size}", *overrides], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"probe failed for {overrides}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="the first two configurations only (the CI dry run)")
    a = p.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}   model: tiny-vit   9 steps, logging every 4th; per non-logging step (median):")
    print(f"{'configuration':30s} {'ours':>6s} {'DeepSpeed':>10s} {'device syncs':>13s}")
    for name, overrides in list(CONFIGS.items())[:2 if a.quick else None]:
        got = probe(overrides, a.batch_size)
        quiet = [s for s in range(2, 10) if s not in got["logged"]]  # step 1 holds one-time set-up
        per_step = [got["calls"].get(str(s), []) for s in quiet]
        ours = statistics.median(sum("vlpretrain/" in x for x in sites) for sites in per_step)
        theirs = statistics.median(sum("deepspeed/" in x for x in sites) for sites in per_step)
        syncs = statistics.median(len(got["device_syncs"].get(str(s), [])) for s in quiet)
        shown = f"{syncs:13.1f}" if torch.cuda.is_available() else f"{'(GPU only)':>13s}"
        print(f"{name:30s} {ours:6.1f} {theirs:10.1f} {shown}")


if __name__ == "__main__":
    main()
