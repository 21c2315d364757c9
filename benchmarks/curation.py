"""Does `vlpretrain curate` work? Three measurements on the Fashion-MNIST demo shards (`make shards`).

contamination  200 Fashion-MNIST test images, resized (up: 40-112 px, and down: 20-27 px, as two separate sets) and
               re-encoded as JPEG (quality 60-95), are planted among the 60,000 training samples; curation's
               decontamination against the fashion-mnist benchmark should find >= 95% of them while flagging < 1% of
               the other samples (Fashion-MNIST's own train set may hold true near-copies of test images: those
               count as false positives here).
neardedup      near duplicates among the 60,000 demo images (thumbnails, cosine >= 0.99): brute force against the
               approximate (IVF) index, their times and whether they find the same groups.
speed          samples per second of each stage (embedding pass without and with a model, decontamination, the
               decision, writing), and the cost of a second threshold when the embeddings are cached.
noise          40% of the demo captions replaced by captions of another class. The demo config trains at equal steps
               on (a) the noisy set, (b) the noisy set filtered by a model trained briefly on a small clean slice
               (top --keep fraction by CLIP score), (c) the clean set; zero-shot top-1 on the 10k test images.
               (a) and (c) do not depend on the filter: a finished run of the same seed and settings is reused
               (WORK/noise_baselines.json), as are the noisy shards, the filtering model and its embeddings, so
               trying another --keep costs one training, another --brief-steps one filtering model more.

    python benchmarks/curation.py --shards shards --work runs/curation-bench            # everything (~30 min)
    python benchmarks/curation.py --quick                                               # fewer steps and samples

Figures are printed and written to WORK/curation_bench.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlpretrain.curation import curate, embed_shards, load_embeddings  # noqa: E402
from vlpretrain.curation.dedup import near_duplicates  # noqa: E402
from vlpretrain.curation.embed import NEAR_COSINE  # noqa: E402
from vlpretrain.curation.read import input_shards, read_samples  # noqa: E402
from vlpretrain.data.sources import fill_template, load_classes, load_templates  # noqa: E402
from vlpretrain.data.writer import ShardSink, write_json_atomic  # noqa: E402
from vlpretrain.formats import MANIFEST, read_idx  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def ensure_demo_shards(shards: Path) -> Path:
    """The demo shards, written as `make shards` writes them when the folder has none."""
    if not (shards / MANIFEST).is_file():
        from vlpretrain.data import write_shards

        write_shards(FMNIST, shards, "labelled", split="train", templates=str(REPO / "configs/captions/fashion_train.txt"),
                     classes=str(REPO / "configs/captions/fashion_classes.txt"), prefix="fmnist", shard_size=5000,
                     workers=2, skip_existing=True)
    return shards


def write_folder(folder: Path, samples, prefix: str = "part", shard_size: int = 5000) -> int:
    """Shards of (key, members) plus a manifest the loader accepts; returns the sample count."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sink = ShardSink(folder, prefix, shard_size, None)
    n = 0
    for key, members in samples:
        sink.add(key, sorted(members.items()))
        n += 1
    write_json_atomic(folder / MANIFEST, {"kind": "benchmark", "samples": n, "shards": sink.finish()})
    return n


def demo_samples(shards: Path, limit: int | None = None):
    n = 0
    for tar in sorted(shards.glob("*.tar")):
        for s in read_samples(str(tar)):
            if limit is not None and n >= limit:
                return
            yield s.key, dict(s.members)
            n += 1


# ---------------------------------------------------------------------------------------------------------------


def contamination(shards: Path, work: Path, limit: int | None) -> dict:
    test = read_idx(Path(FMNIST) / "t10k-images-idx3-ubyte.gz")
    rng = np.random.default_rng(0)
    picks = rng.choice(len(test), 400, replace=False)
    planted = {}
    for j, i in enumerate(picks):
        side = int(rng.integers(40, 113)) if j < 200 else int(rng.integers(20, 28))
        img = Image.fromarray(test[i]).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
        planted[f"planted{'up' if j < 200 else 'down'}{j:04d}"] = {"jpg": buf.getvalue(), "txt": b"a photo"}
    folder = work / "contaminated"
    samples = list(demo_samples(shards, limit))
    mixed = samples + list(planted.items())
    random.Random(0).shuffle(mixed)
    write_folder(folder, mixed, "mixed")
    out = work / "contaminated-out"
    start = time.perf_counter()
    r = curate(str(folder), out, decontaminate=("fashion-mnist",), benchmark_root=FMNIST,
               remove_contaminated=True, progress=False, report=True)
    wall = time.perf_counter() - start
    manifest = json.loads((out / MANIFEST).read_text())
    flagged_keys = _flagged_keys(folder, out)
    up = [k for k in planted if k.startswith("plantedup")]
    down = [k for k in planted if k.startswith("planteddown")]
    others = len(samples)
    fp = len([k for k in flagged_keys if not k.startswith("planted")])
    res = {"training_samples": others, "planted_up": len(up), "planted_down": len(down),
           "recall_upscaled": sum(k in flagged_keys for k in up) / len(up),
           "recall_downscaled": sum(k in flagged_keys for k in down) / len(down),
           "false_positives": fp, "false_positive_rate": fp / others,
           "threshold": NEAR_COSINE, "wall_s": round(wall, 1), "timings": r["timings"],
           "samples_out": manifest["samples"]}
    print(f"contamination: recall {res['recall_upscaled']:.1%} (upscaled copies), {res['recall_downscaled']:.1%} "
          f"(downscaled), false positives {fp} of {others} ({res['false_positive_rate']:.2%}); {wall:.0f} s")
    return res


def _flagged_keys(folder: Path, out: Path) -> set[str]:
    """Keys the decontamination removed: those of the input missing from the output."""
    kept = set()
    for tar in sorted(out.glob("*.tar")):
        kept |= {s.key for s in read_samples(str(tar))}
    every = {s.key for tar in sorted(folder.glob("*.tar")) for s in read_samples(str(tar))}
    return every - kept


# ---------------------------------------------------------------------------------------------------------------


def near_dedup_speed(shards: Path, work: Path) -> dict:
    """Near duplicates of every demo image by brute force and by the IVF index: times and agreement."""
    urls = input_shards(str(shards))
    cache = work / "neardedup-cache"
    embed_shards(urls, cache, None, progress=False)
    emb = load_embeddings(urls, cache, None)
    assert emb is not None
    res: dict = {"samples": len(emb), "threshold": NEAR_COSINE}
    found = {}
    for name, above in (("brute_force", len(emb)), ("ivf", 0)):
        t = time.perf_counter()
        found[name] = near_duplicates(emb.thumbs, emb.valid, NEAR_COSINE, approximate_above=above)
        res[f"{name}_s"] = round(time.perf_counter() - t, 2)
        res[f"{name}_groups"], res[f"{name}_dropped"] = found[name][1], int(found[name][0].sum())
    res["rows_decided_differently"] = int((found["brute_force"][0] != found["ivf"][0]).sum())
    res["speedup"] = round(res["brute_force_s"] / res["ivf_s"], 1)
    print(f"near-dedup of {len(emb)} images at {NEAR_COSINE}: brute force {res['brute_force_s']:.1f} s "
          f"({res['brute_force_groups']} groups, {res['brute_force_dropped']} dropped), IVF {res['ivf_s']:.1f} s "
          f"({res['ivf_groups']} groups, {res['ivf_dropped']} dropped), {res['speedup']}x; "
          f"{res['rows_decided_differently']} rows decided differently")
    return res


# ---------------------------------------------------------------------------------------------------------------


def speed(shards: Path, work: Path, model: str) -> dict:
    out = work / "speed-out"
    shutil.rmtree(out, ignore_errors=True)
    n = json.loads((shards / MANIFEST).read_text())["samples"]
    res: dict = {"samples": n}

    def timed(seconds: str, timings: str, *args, **filters) -> None:
        t = time.perf_counter()
        r = curate(str(shards), out, *args, exact_dedup=True, near_dedup=NEAR_COSINE, progress=False,
                   cache_dir=work / "speed-cache", **filters)
        res[seconds], res[timings] = round(time.perf_counter() - t, 2), r["timings"]

    rules = {"min_words": 2, "max_repeats": 1000000, "boilerplate": True, "report": True, "replace": True}
    timed("pixels_only_first_run_s", "pixels_only_timings", report=False)
    timed("with_model_first_run_s", "with_model_timings", model, fraction=0.5, **rules)
    timed("second_threshold_s", "second_threshold_timings", model, fraction=0.3, **rules)
    tm = res["with_model_timings"]
    res["samples_per_s"] = {"embed pixels": round(n / res["pixels_only_timings"]["embed_s"]),
                            "embed with model": round(n / tm["embed_s"]), "decide": round(n / tm["decide_s"]),
                            "write": round(n / tm["write_s"])}
    print(f"speed ({n} samples): " + ", ".join(f"{k} {v:,}/s" for k, v in res["samples_per_s"].items())
          + f"; first run with the model {res['with_model_first_run_s']:.1f} s, a second threshold "
          f"{res['second_threshold_s']:.1f} s ({res['with_model_first_run_s'] / res['second_threshold_s']:.1f}x less)")
    return res


# ---------------------------------------------------------------------------------------------------------------


def noisy_samples(shards: Path, rate: float, limit: int | None, seed: int = 0):
    """The demo samples with `rate` of their captions replaced by a caption of another class (which ones: `seed`)."""
    classes = load_classes(REPO / "configs/captions/fashion_classes.txt")
    templates = load_templates(REPO / "configs/captions/fashion_train.txt")
    rng = random.Random(seed)
    for key, members in demo_samples(shards, limit):
        meta = json.loads(members["json"])
        if rng.random() < rate:
            wrong = rng.choice([c for i, c in enumerate(classes) if i != meta["label"]])
            caption = fill_template(rng.choice(templates), wrong)
            meta = {**meta, "captions": [caption], "noisy": True}
            members = {**members, "txt": caption.encode(), "json": json.dumps(meta).encode()}
        yield key, members


def train(data: str, run: Path, steps: int, log: Path, seed: int = 0) -> float:
    """Train the demo config on `data` with 2 processes (as `make demo`), weights and data order from `seed`;
    zero-shot top-1 on the 10k test images."""
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + random.randint(0, 2000)), "-m", "vlpretrain.cli", "train", "--config",
           str(REPO / "configs/demo.yaml"), "--set", f"data.train={data}", "--set", f"train.output_dir={run}",
           "--set", f"train.steps={steps}", "--set", f"train.warmup_steps={max(1, steps // 6)}",
           "--set", "eval.linear_probe=false", "--set", f"train.seed={seed}", "--set", f"data.seed={seed}"]
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    results = json.loads((run / "results.json").read_text())
    return next(e["metrics"]["top1"] for e in results["results"] if e["task"] == "zeroshot")


NOISE_RATE = 0.4


def baseline_top1(name: str, write: Callable[[], Path], work: Path, steps: int, seed: int, limit: int | None, log: Path) -> dict:
    """Top-1 of run (a) or (c): neither depends on the filter, so a finished run of the same seed and settings (kept in
    WORK/noise_baselines.json, keyed by them and the demo config's digest) is reused instead of trained again."""
    config = hashlib.sha256((REPO / "configs/demo.yaml").read_bytes()).hexdigest()[:12]
    key = f"{name} seed={seed} steps={steps} limit={limit} noise={NOISE_RATE} config={config}"
    path = work / "noise_baselines.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known:
        print(f"noise: {name}: reusing {known[key]['top1']:.4f} ({known[key]['source']})", flush=True)
        return known[key]
    folder = write()
    known[key] = {"top1": train(f"{folder}/*.tar", work / f"run-{name}", steps, log, seed),
                  "source": f"trained {time.strftime('%Y-%m-%d %H:%M')}"}
    write_json_atomic(path, known)
    return known[key]


def noisy_folder(shards: Path, work: Path, limit: int | None, seed: int) -> Path:
    """The noisy shards, written once per (seed, limit): rewriting them would change their times and so void the
    filter's embedding cache."""
    folder = work / f"noisy-seed{seed}"
    settings = {"seed": seed, "limit": limit, "rate": NOISE_RATE}
    stamp = folder / "noise_settings.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == settings and (folder / MANIFEST).is_file()):
        write_folder(folder, noisy_samples(shards, NOISE_RATE, limit, seed), "noisy")
        stamp.write_text(json.dumps(settings))
    return folder


def noise(shards: Path, work: Path, steps: int, brief_steps: int, keep: float, limit: int | None,
          seed: int = 0) -> dict:
    log = work / "train.log"
    res: dict = {"steps": steps, "brief_steps": brief_steps, "brief_samples": 5000, "keep_fraction": keep,
                 "noise_rate": NOISE_RATE, "seed": seed}
    t0 = time.perf_counter()
    noisy = noisy_folder(shards, work, limit, seed)
    res["noisy_samples"] = json.loads((noisy / MANIFEST).read_text())["samples"]
    slice_ = work / "clean-slice"
    if not (slice_ / MANIFEST).is_file():
        write_folder(slice_, demo_samples(shards, 5000), "slice", shard_size=1000)  # 2 ranks need 2+ shards
    brief = work / f"run-brief-seed{seed}-steps{brief_steps}"
    if not (brief / "model.safetensors").is_file() or not (brief / "results.json").is_file():
        train(f"{slice_}/*.tar", brief, brief_steps, log, seed)
    results = json.loads((brief / "results.json").read_text())["results"]
    res["brief_model_top1"] = next(e["metrics"]["top1"] for e in results if e["task"] == "zeroshot")
    out = work / "filtered"
    t = time.perf_counter()
    r = curate(str(noisy), out, str(brief / "model.safetensors"), fraction=keep, progress=False, replace=True,
               shard_size=2500, cache_dir=work / "filter-cache")
    res["filter_s"] = round(time.perf_counter() - t, 1)
    kept_noisy = 0
    for tar in sorted(out.glob("*.tar")):
        kept_noisy += sum(json.loads(s.members["json"]).get("noisy", False) for s in read_samples(str(tar)))
    res["filtered_samples"] = r["samples_out"]
    res["noise_rate_after_filter"] = kept_noisy / max(1, r["samples_out"])
    a = baseline_top1("a_noisy", lambda: noisy, work, steps, seed, limit, log)
    res["top1_b_filtered"] = train(f"{out}/*.tar", work / "run-b_filtered", steps, log, seed)
    print(f"noise: b_filtered: zero-shot top-1 {res['top1_b_filtered']:.4f}", flush=True)

    def clean() -> Path:
        write_folder(work / "clean", demo_samples(shards, limit), "clean")
        return work / "clean"

    c = baseline_top1("c_clean", clean, work, steps, seed, limit, log)
    res["top1_a_noisy"], res["top1_c_clean"] = a["top1"], c["top1"]
    res["baselines"] = {"a_noisy": a["source"], "c_clean": c["source"]}
    gap = res["top1_c_clean"] - res["top1_a_noisy"]
    res["gap_recovered"] = (res["top1_b_filtered"] - res["top1_a_noisy"]) / gap if gap > 0 else None
    res["wall_s"] = round(time.perf_counter() - t0)
    print(f"noise: brief model {res['brief_model_top1']:.4f}; filter keeps {r['samples_out']} with "
          f"{res['noise_rate_after_filter']:.1%} noisy captions (was 40%); top-1 (a) {res['top1_a_noisy']:.4f} "
          f"(b) {res['top1_b_filtered']:.4f} (c) {res['top1_c_clean']:.4f}; gap recovered "
          f"{res['gap_recovered'] if res['gap_recovered'] is None else round(res['gap_recovered'], 3)}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(REPO / "shards"), help="the demo shards (written when missing)")
    p.add_argument("--work", default=str(REPO / "runs" / "curation-bench"), help="scratch and output folder")
    p.add_argument("--model", default=str(REPO / "runs" / "demo" / "model.safetensors"),
                   help="model for the speed figures (default: make demo's)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each noise run (demo: 300)")
    p.add_argument("--brief-steps", type=int, default=200,
                   help="training steps of the filtering model on its 5,000 clean samples (200: ~10 epochs)")
    p.add_argument("--keep", type=float, default=0.6, help="top fraction the filter keeps (0.6: the clean share)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise experiment: which captions are swapped, and the runs' weights and data order")
    p.add_argument("--limit", type=int, help="use only the first N demo samples in the noise experiment")
    p.add_argument("--quick", action="store_true", help="100 steps, 30 brief steps, 20,000 samples")
    p.add_argument("--only", choices=("contamination", "neardedup", "speed", "noise"), action="append",
                   help="run only these parts (repeatable)")
    a = p.parse_args()
    limit = a.limit
    if a.quick:
        a.steps, a.brief_steps, limit = 100, 30, 20000
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = ensure_demo_shards(Path(a.shards))
    parts = a.only or ["contamination", "neardedup", "speed", "noise"]
    path = work / "curation_bench.json"
    figures = json.loads(path.read_text()) if path.is_file() else {}
    figures["machine"] = f"{os.cpu_count()} CPU cores (shared)"
    if "contamination" in parts:
        figures["contamination"] = contamination(shards, work, None)
        path.write_text(json.dumps(figures, indent=1))
    if "neardedup" in parts:
        figures["neardedup"] = near_dedup_speed(shards, work)
        path.write_text(json.dumps(figures, indent=1))
    if "speed" in parts:
        if Path(a.model).is_file():
            figures["speed"] = speed(shards, work, a.model)
        else:
            print(f"speed: skipped, no model at {a.model} (make demo, or --model)")
        path.write_text(json.dumps(figures, indent=1))
    if "noise" in parts:
        figures["noise" if a.seed == 0 else f"noise_seed{a.seed}"] = noise(shards, work, a.steps, a.brief_steps,
                                                                           a.keep, limit, a.seed)
        path.write_text(json.dumps(figures, indent=1))
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
