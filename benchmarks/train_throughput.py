"""Training throughput of vlpretrain against open_clip's own trainer (open_clip_train), in one invocation.

Both run the same model, batch size, precision and synthetic data (open_clip's SyntheticDataset through a DataLoader
with the same worker count), each in its own process, one after the other. Prints samples/s of each (median over the
steps after warm-up), the ratio, and on a GPU the model FLOPs utilisation (MFU). Both log every `--log-every` steps
(10): each logged rate covers the steps since the last, and only those steps read the loss on the host, as in a
real run; logging every step would make both wait for the GPU every step.

    python benchmarks/train_throughput.py --model tiny-vit --batch-size 64 --steps 30
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --steps 60   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# dense bf16 peak, FLOP/s, by substring of the device name (vendor data sheets)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def _ours(a: argparse.Namespace, out: str) -> None:
    """Child process: vlpretrain.train on open_clip's synthetic dataset."""
    import torch
    from open_clip_train.data import SyntheticDataset

    from vlpretrain.config import load_config
    from vlpretrain.data import EpochBatches
    from vlpretrain.models import build_model, get_tokenizer, image_size, image_transform
    from vlpretrain.trainer import train

    cfg = load_config(None, [
        "data.train=synthetic", f"model.name={a.model}", f"data.batch_size={a.batch_size}",
        f"train.steps={a.steps}", f"train.precision={a.precision}", f"train.zero_stage={a.zero_stage}",
        f"train.log_every={a.log_every}", "train.progress=false", f"train.output_dir={out}",
        f"train.warmup_steps={min(10, a.steps)}",
        f"model.compile={str(a.compile).lower()}", f"train.loss_chunk={a.loss_chunk}"])
    model = build_model(cfg.model)
    size = image_size(model)
    ds = SyntheticDataset(image_transform(model, train=True), (size, size), "a synthetic caption",
                          dataset_size=a.batch_size * (a.steps + 5), tokenizer=get_tokenizer(cfg.model))

    def data(epoch: int, start: int):
        loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers, drop_last=True,
                                             pin_memory=torch.cuda.is_available())
        for i, batch in enumerate(loader):
            if i >= start:
                yield batch

    train(cfg, data=EpochBatches(data))
    _write_peak(out)


def _open_clip(a: argparse.Namespace, out: str) -> None:
    """Child process: open_clip_train.main with --dataset-type synthetic."""
    from open_clip_train.main import main

    from vlpretrain.models import register_model_configs

    register_model_configs()  # so our tiny configs resolve by name in open_clip too
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[a.precision]
    main(["--model", a.model, "--dataset-type", "synthetic", "--train-num-samples", str(a.batch_size * a.steps),
          "--batch-size", str(a.batch_size), "--epochs", "1", "--workers", str(a.workers), "--precision", precision,
          "--lr", "5e-4", "--warmup", "10", "--log-every-n-steps", str(a.log_every), "--logs", out, "--name", "bench",
          "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
          "--local-loss", "--gather-with-grad", "--seed", "0",
          "--grad-clip-norm", "1.0", *(["--torchcompile"] if a.compile else [])])  # 1.0: our train.clip_grad default
    _write_peak(out)


def _write_peak(out: str) -> None:
    """Peak memory of this child: the GPU's allocator high-water mark, else the process's peak resident set."""
    import resource

    import torch

    peak = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peak["cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (Path(out) / "peak.json").write_text(json.dumps(peak))


def _median_after_warmup(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


def _run_child(which: str, a: argparse.Namespace, out: str) -> tuple[list[float], str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, __file__, "--child", which, "--out", out, *sys.argv[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{log[-3000:]}")
    peak = json.loads((Path(out) / "peak.json").read_text())
    if which == "ours":
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return [r["samples_per_s"] for r in rows if "samples_per_s" in r], log, peak
    text = log + "".join(p.read_text() for p in Path(out).rglob("out.log"))
    # "Batch (t): <mean step seconds over the log window>, <rate of the window's last step>/s": the window's mean,
    # as our rows are
    return [a.batch_size / float(x) for x in re.findall(r"Batch \(t\): ([\d.]+), ", text) if float(x) > 0], log, peak


def _flops_per_sample(model_name: str) -> float:
    """Training FLOPs for one image-text pair (forward + backward), counted by torch on one sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlpretrain.models import build_model, image_size

    model = build_model(model_name)
    s = image_size(model)
    ctx = model.context_length if hasattr(model, "context_length") else 77
    images, text = torch.randn(1, 3, s, s), torch.randint(1, 1000, (1, ctx))
    with FlopCounterMode(display=False) as fc:
        out = model(images, text)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    return float(fc.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between logged rates (both trainers read the loss on the host only then)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--loss-chunk", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--child", choices=["ours", "open_clip"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        (_ours if a.child == "ours" else _open_clip)(a, a.out)
        return

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results, peaks = {}, {}
    for which in ("open_clip", "ours"):
        with tempfile.TemporaryDirectory() as out:
            rates, _, peaks[which] = _run_child(which, a, out)
        results[which] = _median_after_warmup(rates, -(-a.warmup // a.log_every))  # rows, one per log_every
    ratio = results["ours"] / results["open_clip"]
    print(f"device: {device}   model: {a.model}   batch: {a.batch_size}   precision: {a.precision}   "
          f"steps: {a.steps} (median after {a.warmup})   compile: {a.compile}")
    print(f"open_clip_train : {results['open_clip']:10.1f} samples/s")
    print(f"vlpretrain      : {results['ours']:10.1f} samples/s   (ZeRO-{a.zero_stage})")
    print(f"ratio           : {ratio:10.2f}x")
    kind = "cuda_gib" if "cuda_gib" in peaks["ours"] else "rss_gib"
    what = "GPU memory allocated" if kind == "cuda_gib" else "process resident set"
    print(f"peak memory     : open_clip_train {peaks['open_clip'][kind]:.2f} GiB, vlpretrain "
          f"{peaks['ours'][kind]:.2f} GiB ({what})")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            f = _flops_per_sample(a.model)
            for which, rate in results.items():
                print(f"MFU {which:10s}: {100 * rate * f / peak:6.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
