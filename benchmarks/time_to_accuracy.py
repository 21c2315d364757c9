"""Time to a zero-shot accuracy with FLIP's masked patches: the demo run with patch dropout 0, 0.5 and 0.75.

Each setting trains `configs/demo.yaml` (tiny ViT on the Fashion-MNIST shards) in one process with ZeRO-0 through
`vlpretrain train`, evaluating zero-shot top-1 on the Fashion-MNIST test set every `--eval-every` steps (on
`--eval-images` images, to keep it cheap); once an evaluation reaches `--target`, the run is sent SIGTERM (it
checkpoints and exits), else it stops at `--max-steps`. Training time excludes the evaluations: it is read from the
wall-clock stamps of `metrics.jsonl` (an evaluation runs right after the metrics line of its step).

    PYTHONPATH=. python benchmarks/time_to_accuracy.py --shards '/tmp/fm14/fmnist-{000000..000011}.tar'

Make the shards first with `vlpretrain make-shards /usr/share/datasets/fashion-mnist OUT --format labelled --split
train --templates configs/captions/fashion_train.txt --classes configs/captions/fashion_classes.txt --prefix
fmnist --shard-size 5000`. The tiny ViT sees 28 px images as 16 patches of 7 px, so masking saves less than on a
ViT-B/16 at 224 px (196 patches), where the image tower is most of the cost; `--model tiny-vit-p4` (49 patches of
4 px, the image tower 86% of a step's FLOPs) is closer to that. By torch's FLOP counter a training step of batch
128 costs 15.3 / 10.4 / 8.0 GFLOP (tiny-vit) and 35.2 / 20.1 / 12.9 GFLOP (tiny-vit-p4) at patch dropout 0 / 0.5 /
0.75: the ideal speed-ups per step are 1.46x / 1.90x and 1.75x / 2.73x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = "fashion-mnist"


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def train_seconds(rows: list[dict[str, Any]], batch: int) -> dict[int, float]:
    """Training wall time up to each logged step, evaluations left out."""
    train = [r for r in rows if "loss" in r and "eval" not in r]
    if not train:
        return {}
    at = {r["step"]: r["time"] for r in train}
    first = train[0]
    # the first window starts where the loop starts: its length from the trainer's own samples/s
    t0 = first["time"] - first["step"] * batch / first["samples_per_s"]
    evals = sorted((r["step"], r["time"] - at[r["step"]]) for r in rows if r.get("eval") == BENCHMARK and r["step"] in at)
    return {s: t - t0 - sum(d for e, d in evals if e < s) for s, t in at.items()}


def run_setting(a: argparse.Namespace, dropout: float, out: Path) -> dict[str, Any]:
    """Train one setting until the target or the step budget; the steps, seconds and accuracy it took."""
    sets = [f"data.train={a.shards}", f"train.output_dir={out}", "train.zero_stage=0", f"train.steps={a.max_steps}",
            f"model.name={a.model}", f"train.unmasked_steps={a.unmasked_steps if dropout else 0}",
            f"data.batch_size={a.batch_size}", f"model.patch_dropout={dropout}", f"eval.every={a.eval_every}",
            f"eval.max_images={a.eval_images}", "eval.linear_probe=false", "train.progress=false",
            f"train.log_every={a.log_every}", f"eval.root={a.root}", f"eval.benchmarks=[{BENCHMARK}]"]
    cmd = [sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        reached = None
        while proc.poll() is None:
            time.sleep(1.0)
            evals = [r for r in _rows(metrics) if r.get("eval") == BENCHMARK]
            reached = next((r for r in evals if r["top1"] >= a.target), None)
            if reached is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
    if proc.returncode not in (0, 130):
        sys.exit(f"patch dropout {dropout}: training failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    rows = _rows(metrics)
    evals = [r for r in rows if r.get("eval") == BENCHMARK]
    seconds = train_seconds(rows, a.batch_size)
    shown = reached or (evals[-1] if evals else {"step": max(seconds), "top1": float("nan")})
    last_step = max(seconds)
    return {"dropout": dropout, "reached": reached is not None, "step": shown["step"], "top1": shown["top1"],
            "train_s": seconds.get(shown["step"], seconds[last_step]),
            "images_per_s": last_step * a.batch_size / seconds[last_step],
            "best_top1": max(r["top1"] for r in evals) if evals else float("nan"),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="the Fashion-MNIST training shards (brace pattern)")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST test set")
    p.add_argument("--dropouts", default="0,0.5,0.75", help="patch dropout fractions, comma-separated")
    p.add_argument("--model", default="tiny-vit", help="tiny-vit (16 patches) or tiny-vit-p4 (49 patches)")
    p.add_argument("--unmasked-steps", type=int, default=0,
                   help="FLIP's unmasked phase: final steps of the budget trained without masking")
    p.add_argument("--target", type=float, default=0.80, help="zero-shot top-1 to reach")
    p.add_argument("--max-steps", type=int, default=800, help="step budget per setting")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=10, help="must divide --eval-every")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the training process")
    a = p.parse_args()
    if a.eval_every % a.log_every:
        sys.exit("--log-every must divide --eval-every")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dropout in (float(x) for x in a.dropouts.split(",")):
            results.append(run_setting(a, dropout, Path(tmp) / f"p{dropout}"))
            r = results[-1]
            print(f"patch dropout {dropout}: {'reached' if r['reached'] else 'did not reach'} {a.target:.0%} "
                  f"(step {r['step']}, top-1 {r['top1']:.3f}, {r['train_s']:.0f} s training)", flush=True)
    base = results[0]
    print(f"\ndemo config with {a.model}, one process, ZeRO-0, batch {a.batch_size}, target zero-shot top-1 "
          f"{a.target:.0%} on "
          f"{a.eval_images} Fashion-MNIST test images (evaluated every {a.eval_every} steps)")
    print(f"{'patch dropout':>13} {'reached':>7} {'steps':>6} {'train s':>8} {'top-1':>6} {'best':>6} "
          f"{'images/s':>9} {'speed':>6} {'time to target':>15}")
    for r in results:
        to_target = f"{r['train_s'] / base['train_s']:.2f}x" if r["reached"] and base["reached"] else "-"
        print(f"{r['dropout']:>13} {'yes' if r['reached'] else 'no':>7} {r['step']:>6} {r['train_s']:>8.0f} "
              f"{r['top1']:>6.3f} {r['best_top1']:>6.3f} {r['images_per_s']:>9.0f} "
              f"{r['images_per_s'] / base['images_per_s']:>5.2f}x {to_target:>15}")
    print("speed: training images/s relative to the first setting; time to target: training seconds (evaluation "
          "excluded) relative to the first setting")


if __name__ == "__main__":
    main()
