"""`vlpretrain` console script: parse, look up, call. Library functions take plain arguments, never this namespace."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from vlpretrain.console import Commands, check_writable, format_bytes
from vlpretrain.errors import ConfigError, VLPretrainError

COMMANDS = Commands("vlpretrain", "Contrastive vision-language pretraining.")
command = COMMANDS.command


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; may be repeated")


@command("info", "print the resolved run config, parameter counts, and a plan: memory per ZeRO stage, FLOPs, "
                 "epoch size")
def _info(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--no-model", action="store_true", help="skip building the model (parameters, memory, FLOPs)")
    p.add_argument("--no-data", action="store_true", help="skip counting the samples of an epoch")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="ranks to plan for (default: the launcher's WORLD_SIZE, else 1)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node, for DeepSpeed's host-memory estimate (default: 8, or the most that divides "
                        "--world-size)")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import dump_yaml, load_config

        cfg = load_config(a.config, a.overrides)
        world = a.world_size
        per_node = a.gpus_per_node or math.gcd(world, 8)  # checked with the memory figures that use it
        print(f"# resolved config of {a.config}")
        print(dump_yaml(cfg), end="")
        from vlpretrain.accumulate import contrastive_batch

        t = cfg.train
        print(f"# batch: {cfg.data.batch_size} per rank x {t.grad_accum} micro-steps ({t.accumulation}) x "
              f"{world} ranks (--world-size)")
        batch = contrastive_batch(t, cfg.data.batch_size, world)
        for k, v in batch.items():
            print(f"#   {k}: {v:,}")
        if not a.no_model:
            _print_model_plan(cfg, world, per_node, batch["samples per optimizer step"])
        if not a.no_data:
            _print_epoch(cfg, world)
        return 0

    return run


def _flops(n: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _print_model_plan(cfg, world: int, per_node: int, samples_per_step: int) -> None:
    """Parameter counts, model-state memory per ZeRO stage and FLOPs per sample (vlpretrain.planning's figures)."""
    from vlpretrain.engine.core import zero_stage_run
    from vlpretrain.engine.memory import largest_layer_params, model_state_memory
    from vlpretrain.models import build_model, count_parameters, image_size
    from vlpretrain.objectives import objective_class
    from vlpretrain.planning import flops_per_sample

    model = build_model(cfg.model, objective_class(cfg.train.objective).model_options(cfg), load_pretrained=False)
    counts = count_parameters(model)
    print("# parameters")
    for k, v in counts.items():
        print(f"#   {k}: {v:,}")
    t = cfg.train
    precision = "fp32" if t.precision == "fp32" else "bf16"  # auto is bf16 on the GPUs a launch plans for
    rows = model_state_memory(counts["trainable"], counts["total"] - counts["trainable"],
                              largest_layer_params(model), world, per_node, precision)
    note = " (auto: bf16 on a GPU)" if t.precision == "auto" else ""
    print(f"# model states per rank (weights, gradients, AdamW states; activations not counted), {precision}{note}, "
          f"{world} ranks = {world // per_node} node(s) x {per_node} GPUs:")
    if precision == "bf16":
        print("#   DeepSpeed's estimators: 16-bit weights; 16-bit + fp32 gradients, fp32 master weights and moments")
    else:
        print("#   DeepSpeed's accounting with fp32 weights and gradients (its estimators assume 16-bit weights)")
    print("#   CPU/node: host memory DeepSpeed's estimators ask for (each local rank loading the model; offloaded, "
          "the optimizer states)")
    print(f"#   {'':9}{'GPU/rank':>12}{'CPU/node':>12}   optimizer offloaded:{'GPU/rank':>12}{'CPU/node':>12}")
    runs_as = zero_stage_run(dataclasses.replace(t, precision=precision))
    for stage in range(4):
        plain = next(r for r in rows if r.stage == stage and not r.offload)
        off = next((r for r in rows if r.stage == stage and r.offload), None)
        mark = "*" if stage == t.zero_stage else " "
        gpu, cpu = format_bytes(plain.gpu_bytes), format_bytes(plain.cpu_bytes)
        line = f"#   ZeRO-{stage} {mark} {gpu:>12}{cpu:>12}   "
        line += (f"{'':20}{format_bytes(off.gpu_bytes):>12}{format_bytes(off.cpu_bytes):>12}" if off
                 else f"{'':20}{'-':>12}")
        if stage == t.zero_stage and runs_as != stage:
            line += f"   (runs as ZeRO-{runs_as} under bf16)"
        print(line.rstrip())
    print(f"#   * train.zero_stage{' with train.offload_optimizer' if t.offload_optimizer else ''}")
    size, context = cfg.data.image_size or image_size(model), model.context_length
    f = flops_per_sample(model, size, context)
    print(f"# FLOPs per training sample (one {size}px image and {context} tokens, model.patch_dropout "
          f"{cfg.model.patch_dropout}), counted by torch's FlopCounterMode:")
    print(f"#   forward: {_flops(f.forward)}")
    print(f"#   backward: {_flops(f.backward)} (counted: {f.backward / max(f.forward, 1):.2f} x forward)")
    print(f"#   model FLOPs (forward + backward, the MFU convention): {_flops(f.train)}")
    exact = t.accumulation == "exact" and t.grad_accum > 1
    use = "in use" if exact else f"not in use: train.accumulation {t.accumulation}, train.grad_accum {t.grad_accum}"
    print(f"#   exact accumulation adds a no-grad forward: {_flops(f.forward)} ({use})")
    print(f"#   locked towers save: {_flops(f.locked_saving)} of {_flops(f.backward_unlocked)} backward")
    executed = f.train + (f.forward if exact else 0)
    print(f"#   per optimizer step ({samples_per_step:,} samples): {_flops(f.train * samples_per_step)} model, "
          f"{_flops(executed * samples_per_step)} executed")
    print(f"#   run (train.steps {t.steps:,}): {_flops(f.train * samples_per_step * t.steps)} model")


def _print_epoch(cfg, world: int) -> None:
    """Samples and steps of one epoch of the configured data, or why they are unknown."""
    from vlpretrain.planning import epoch_size

    try:
        e = epoch_size(cfg.data, world, cfg.train.grad_accum)
    except VLPretrainError as err:
        print(f"# epoch: unknown ({err})")
        return
    print(f"# epoch ({e.counted_from}): {e.samples:,} samples, {e.batches_per_rank:,} batches per rank, "
          f"{e.steps:,.1f} optimizer steps; train.steps {cfg.train.steps:,} = {cfg.train.steps / e.steps:,.2f} epochs")


@command("train", "train a model from a run config (one process, torchrun or the deepspeed launcher)")
def _train(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--resume", metavar="latest|CKPT", help="continue from the run's latest checkpoint or a given one")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds an earlier run's checkpoints (they are deleted)")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import load_config
        from vlpretrain.trainer import train

        summary = train(load_config(a.config, a.overrides), resume=a.resume, overwrite=a.overwrite)
        return 0 if not summary["interrupted"] else 130

    return run


@command("export", "write a consolidated safetensors model from a checkpoint of any ZeRO stage")
def _export(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="checkpoint folder, a run folder (its latest checkpoint), or an export of ours")
    p.add_argument("out", help="output .safetensors file, or a folder with --format open_clip")
    p.add_argument("--format", choices=("safetensors", "open_clip"), default="safetensors",
                   help="open_clip: open_clip's local model folder, loadable as `local-dir:OUT` by open_clip and "
                        "CLIP_benchmark")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.engine import export_checkpoint

        check_writable(a.out)
        print(export_checkpoint(a.checkpoint, a.out, format=a.format))
        return 0

    return run


@command("make-shards", "write an image-caption source as webdataset tar shards")
def _make_shards(p: argparse.ArgumentParser):
    from vlpretrain.data.sources import FORMATS

    p.add_argument("source", help="csv/tsv/jsonl table, COCO captions json, caption folder, or labelled set")
    p.add_argument("outdir", help="folder for the shards and _manifest.json")
    p.add_argument("--format", choices=sorted(FORMATS), help="source format (detected when obvious)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--shard-bytes", type=int, help="also start a new shard before this many bytes")
    p.add_argument("--max-side", type=int, help="resize images whose longer side exceeds this, keeping aspect")
    p.add_argument("--reencode", action="store_true", help="store every image as JPEG")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of JPEGs the writer encodes")
    p.add_argument("--workers", type=int, default=1, help="processes preparing images")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order and of template captions")
    p.add_argument("--templates", help="caption templates file, one per line with {c} (labelled format)")
    p.add_argument("--classes", help="class names in label order (labelled format): a file with one per line, or "
                   "a benchmark name from `zeroshot list` (e.g. fashion-mnist); idx files otherwise get numbers")
    p.add_argument("--split", default="train", help="split of an idx set: train or test (labelled format)")
    p.add_argument("--image-column", default="image", help="table column with image paths (img2dataset: url)")
    p.add_argument("--caption-column", default="caption", help="table column with captions")
    p.add_argument("--image-root", help="folder that relative image paths start from")
    p.add_argument("--one-sample-per-caption", action="store_true",
                   help="one sample per caption row instead of one per image with all its captions")
    p.add_argument("--keep-order", action="store_true",
                   help="write samples in source order instead of a seeded random order of the whole source")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing when OUTDIR holds intact shards written from the same inputs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset OUTDIR holds: its manifest's shards are deleted, other tar files kept "
                        "(by default another dataset there is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.data import write_shards

        m = write_shards(a.source, a.outdir, a.format, prefix=a.prefix, shard_size=a.shard_size,
                         shard_bytes=a.shard_bytes, max_side=a.max_side, reencode=a.reencode,
                         jpeg_quality=a.jpeg_quality, workers=a.workers, seed=a.seed, templates=a.templates,
                         classes=_class_names(a.classes), split=a.split, image_column=a.image_column,
                         caption_column=a.caption_column, image_root=a.image_root,
                         one_sample_per_caption=a.one_sample_per_caption, keep_order=a.keep_order,
                         skip_existing=a.skip_existing, replace=a.overwrite,
                         progress=not a.no_progress)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(m["skipped"]["by_reason"].items()))
        print(f"{a.outdir}: {m['samples']} samples in {len(m['shards'])} shards; "
              f"skipped {m['skipped']['count']}{f' ({reasons})' if reasons else ''}")
        return 0

    return run


@command("index-shards", "count the samples of shards written elsewhere (img2dataset, DataComp) once, into a manifest")
def _index_shards(p: argparse.ArgumentParser):
    p.add_argument("shards", metavar="DIR|PATTERN", help="a folder of .tar shards, a brace pattern or a glob "
                   "(local or object storage)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes scanning shards")
    p.add_argument("--out", metavar="DIR", help="write the index into DIR instead of beside the shards (a "
                   "read-only folder); training then names it with data.index")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.data import index_shards

        if a.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {a.workers}")
        path, counts = index_shards(a.shards, workers=a.workers, out=a.out)
        print(f"{path}: {counts.describe()}")
        if a.out:
            print(f"train on them with --set data.index={a.out}")
        return 0

    return run


@command("curate", "filter shards into a new dataset: CLIP score, caption rules, duplicates, benchmark overlap")
def _curate(p: argparse.ArgumentParser):
    p.add_argument("shards", metavar="DIR|PATTERN", help="input shards: a folder of .tar files or a brace pattern")
    p.add_argument("outdir", help="folder for the curated shards, _manifest.json and curation_report.json/.png")
    p.add_argument("--model", help="scores image-text agreement: an export of ours (.safetensors) or an open_clip "
                   "architecture name (with --pretrained)")
    p.add_argument("--pretrained", help="local weights for an architecture name")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--threshold", type=float, help="keep pairs whose CLIP score (cosine) is at least this")
    keep.add_argument("--fraction", type=float, help="keep this top fraction of pairs by CLIP score (e.g. 0.3)")
    p.add_argument("--min-words", type=int, help="drop captions with fewer words")
    p.add_argument("--max-words", type=int, help="drop captions with more words")
    p.add_argument("--languages", help="keep captions langid identifies as one of these, comma-separated (e.g. en)")
    p.add_argument("--max-repeats", type=int, help="drop captions shared by more than this many samples (ALIGN: 10)")
    p.add_argument("--boilerplate", action="store_true",
                   help="drop C4-like boilerplate captions (lorem ipsum, {, cookie notices, file names, links)")
    p.add_argument("--max-repeated-words", type=float,
                   help="drop captions where more than this fraction of the words repeat an earlier one")
    p.add_argument("--exact-dedup", action="store_true", help="keep one sample per decoded image (pixel hash)")
    p.add_argument("--near-dedup", type=float, metavar="COSINE",
                   help="keep one sample per group of images this similar or more (e.g. 0.99)")
    p.add_argument("--near-space", choices=("pixels", "model"), default="pixels",
                   help="near duplicates and decontamination compare the differences of 12x12 grey thumbnails "
                        "(pixels, default) or the model's image embeddings")
    p.add_argument("--near-approximate-above", type=int, metavar="N",
                   help="near duplicates among more than N images are searched with an approximate faiss index "
                        "(IVF; default 10000), fewer by brute force")
    p.add_argument("--decontaminate", metavar="BENCHMARKS",
                   help="comma-separated benchmarks (see `zeroshot list`) whose test images are looked for")
    p.add_argument("--benchmark-root", help="folder with the benchmarks' data (as `zeroshot eval --root`)")
    p.add_argument("--decontam-threshold", type=float, metavar="COSINE",
                   help="cosine at or above which a training image counts as a test image (default 0.99)")
    p.add_argument("--remove-contaminated", action="store_true",
                   help="drop the samples decontamination finds (default: report them only)")
    p.add_argument("--cache-dir", help="embedding cache (default: OUTDIR/.curate-cache)")
    p.add_argument("--workers", type=int, default=1, help="processes embedding shards (RANK/WORLD_SIZE split too)")
    p.add_argument("--batch-size", type=int, default=256, help="images per model batch")
    p.add_argument("--device", help="torch device of the model (default: cpu)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")
    p.add_argument("--prefix", default="curated", help="output shard names: PREFIX-000000.tar, ...")
    p.add_argument("--overwrite", action="store_true", help="replace another dataset OUTDIR holds")
    p.add_argument("--no-report", action="store_true", help="write no curation_report.json / .png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.curation import CurationOptions, curate

        def names(arg: str | None) -> tuple[str, ...] | None:
            return None if arg is None else tuple(n.strip() for n in arg.split(",") if n.strip())

        unset_means_default = {"decontam_threshold": a.decontam_threshold,
                               "near_approximate_above": a.near_approximate_above}
        opts = CurationOptions.from_flat(
            threshold=a.threshold, fraction=a.fraction, min_words=a.min_words, max_words=a.max_words,
            languages=names(a.languages), max_repeats=a.max_repeats, boilerplate=a.boilerplate,
            max_repeated_words=a.max_repeated_words, exact_dedup=a.exact_dedup, near_dedup=a.near_dedup,
            near_space=a.near_space, decontaminate=names(a.decontaminate) or (), benchmark_root=a.benchmark_root,
            remove_contaminated=a.remove_contaminated, shard_size=a.shard_size, prefix=a.prefix,
            **{k: v for k, v in unset_means_default.items() if v is not None})
        r = curate(a.shards, a.outdir, a.model, pretrained=a.pretrained, options=opts, cache_dir=a.cache_dir,
                   workers=a.workers, batch_size=a.batch_size, device=a.device, replace=a.overwrite,
                   report=not a.no_report, progress=not a.no_progress)
        if "samples_out" not in r:
            print(f"rank {r['rank']}: embedded {r['embedded_shards']} shard(s); rank 0 writes {a.outdir}")
            return 0
        removed = ", ".join(f"{k}: {v}" for k, v in r["removed"].items() if v)
        print(f"{a.outdir}: kept {r['samples_out']} of {r['samples_in']} samples"
              + (f"; removed {removed}" if removed else "")
              + (f"; score threshold {r['score_threshold']:.4f}" if r["score_threshold"] is not None else ""))
        for bench, c in r["contamination"].items():
            print(f"{bench}: {c['flagged']} training samples look like its test images"
                  + (" (removed)" if c["removed"] else " (kept; --remove-contaminated drops them)"))
        return 0

    return run


def _class_names(arg: str | None) -> str | list[str] | None:
    """--classes: a file of names as it is, else the class names of the benchmark it names (looked up by the
    installed packages of the `vlpretrain.class_names` entry-point group: zeroshot's benchmark registry)."""
    if arg is None or Path(arg).exists():
        return arg
    from importlib.metadata import entry_points

    for ep in entry_points(group="vlpretrain.class_names"):
        try:
            return list(ep.load()(arg))
        except VLPretrainError:
            continue
    raise ConfigError(f"--classes {arg}: neither a class names file nor a benchmark name (see `zeroshot list`)")


@command("upcycle", "turn a dense checkpoint into an MoE one whose experts copy its MLPs (model.moe of --config)")
def _upcycle(p: argparse.ArgumentParser):
    p.add_argument("--from", dest="source", required=True, metavar="DENSE",
                   help="dense checkpoint: an export of ours, or an open_clip .pt/.bin/.safetensors file")
    p.add_argument("--arch", help="architecture of an open_clip checkpoint (default: model.name of --config)")
    _config_args(p)
    p.add_argument("--out", required=True, metavar="MOE_CKPT", help="where to write the MoE export (.safetensors)")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import load_config
        from vlpretrain.errors import ConfigError
        from vlpretrain.models import count_parameters, read_export_config, upcycle

        cfg = load_config(a.config, a.overrides)
        check_writable(a.out)
        if cfg.model.moe.num_experts < 1:
            raise ConfigError(f"{a.config}: model.moe.num_experts: must be >= 1 to upcycle")
        arch = a.arch
        if arch is None and read_export_config(a.source) is None:
            arch = cfg.model.name
        model = upcycle(a.source, cfg.model.moe, a.out, arch=arch, seed=cfg.train.seed)
        counts = count_parameters(model)
        print(f"wrote {a.out}: {counts['total']:,} parameters, {counts['active per token']:,} active per token")
        print(f"train it with: vlpretrain train --config {a.config} --set model.pretrained={a.out}")
        return 0

    return run


@command("tokenizer", "train a tokenizer on the shards' captions (Hugging Face tokenizers), for a text tower from "
                      "scratch: `vlpretrain tokenizer train SHARDS --vocab-size N --out DIR`")
def _tokenizer(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["train"], help="train: learn a vocabulary from the captions")
    p.add_argument("shards", help="shards to read captions from (brace pattern, glob or `::`-separated list)")
    p.add_argument("--vocab-size", type=int, required=True, help="most tokens in the vocabulary, specials included")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write (AutoTokenizer.from_pretrained(DIR) loads it; a model config's "
                        "text_cfg.hf_tokenizer_name)")
    p.add_argument("--type", dest="kind", default="unigram", choices=["unigram", "bpe"],
                   help="unigram (sentencepiece-style, default) or byte-level BPE")
    p.add_argument("--text-key", default="txt", help="sample member holding the caption (as data.text_key)")
    p.add_argument("--lowercase", action="store_true",
                   help="lower-case every text first (evaluation prompts then match captions whatever their case)")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.data.plan import expand_shards
        from vlpretrain.tokenizer import shard_captions, train_tokenizer

        urls = [u for group in expand_shards(a.shards) for u in group]
        check_writable(a.out)
        out = train_tokenizer(shard_captions(urls, a.text_key), a.vocab_size, a.out, a.kind, a.lowercase)
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(str(out)))
        print(f"wrote {out}: {a.kind} tokenizer, {size:,} tokens, trained on the captions of {len(urls)} shards")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    return COMMANDS.build_parser()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    return COMMANDS.main(argv)


if __name__ == "__main__":
    sys.exit(main())
