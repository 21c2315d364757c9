"""`curate`: shards in, a curated dataset out (shards + manifest, all or nothing), plus a report.

What is kept is decided by `curation.decide` from the embeddings alone. Everything about images comes from the embedding pass (`curation.embed`), cached per shard and model, so a second
run with other thresholds only reads the cache and copies the kept samples.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlpretrain import storage
from vlpretrain.curation import decontaminate as decon
from vlpretrain.curation.decide import CurationOptions, Decision, decide
from vlpretrain.curation.embed import Embeddings, Scorer, embed_shards, load_embeddings, load_scorer
from vlpretrain.curation.read import Bad, input_shards, read_samples
from vlpretrain.curation.report import Examples, write_report
from vlpretrain.data.loader import dist_rank_world
from vlpretrain.data.writer import MANIFEST_VERSION, ShardSink, check_replaceable, swap_in
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import INCOMPLETE
from vlpretrain.progress import progress as progress_bar

log = logging.getLogger(__name__)

CACHE_DIR = ".curate-cache"  # inside the output folder unless a cache dir is given
REPORT = "curation_report"

def _with_score(json_bytes: bytes | None, score: float | None, where: str) -> bytes:
    """The sample's json member with its CLIP score added (a new member when it had none)."""
    meta: dict[str, Any] = {}
    if json_bytes is not None:
        try:
            meta = json.loads(json_bytes)
        except ValueError:
            raise DataError(f"{where}: json member is not valid JSON") from None
        if not isinstance(meta, dict):
            meta = {"json": meta}
    if score is not None:
        meta["clip_score"] = round(float(score), 6)
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _write_kept(urls: Sequence[str], emb: Embeddings, decision: Decision, staging: Path, opts: CurationOptions,
                progress: bool, examples: Callable[[int, bytes, str], None]) -> list[dict[str, Any]]:
    """Copy the kept samples of every input shard into new shards in `staging`; `examples(row, image, ext)` sees
    the image of every row (the report picks its thumbnails from them)."""
    sink = ShardSink(staging, opts.prefix, opts.shard_size, None)
    scores = emb.scores
    row = 0
    try:
        with progress_bar(len(urls), "curate: write", "shard", enabled=progress) as bar:
            for url in urls:
                for s in read_samples(url):
                    if row >= len(emb) or emb.keys[row] != s.key:
                        raise DataError(f"{url}: sample {s.key} is not the one embedded (the shard changed while "
                                        "curating); run again")
                    if not isinstance(s, Bad):
                        examples(row, s.members[s.image_ext], s.image_ext)
                        if decision.reasons[row] is None:
                            members = {**s.members, "json": _with_score(
                                s.members.get("json"), None if scores is None else scores[row], f"{url}: {s.key}")}
                            sink.add(s.key, sorted(members.items()))
                    row += 1
                bar.update(1)
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


def _wait_for_embeddings(urls: Sequence[str], cache_dir: Path, scorer: Scorer | None, world: int,
                         timeout_s: float) -> Embeddings:
    """Rank 0 of several: the whole dataset's embeddings once every rank has stored its share."""
    start = time.monotonic()
    while (emb := load_embeddings(urls, cache_dir, scorer)) is None:
        if time.monotonic() - start > timeout_s:
            raise DataError(f"{cache_dir}: the other {world - 1} ranks did not finish embedding their shards within "
                            f"{timeout_s:.0f} s")
        time.sleep(1.0)
    return emb


def curate(shards: str, outdir: str | os.PathLike, model: str | Scorer | None = None, *,
           pretrained: str | None = None, options: CurationOptions | None = None,
           cache_dir: str | os.PathLike | None = None, workers: int = 1, batch_size: int = 256,
           device: str | None = None, replace: bool = False, report: bool = True, progress: bool = True,
           rank: int | None = None, world_size: int | None = None, wait_timeout_s: float = 86400.0,
           **filters: Any) -> dict[str, Any]:
    """Curate the shards `shards` names (a folder or a pattern) into `outdir`; returns the report (a dict).

    `model` (an export of ours, an open_clip architecture with local weights in `pretrained`, or a `Scorer`)
    scores image-text agreement; `options` (or the same fields as keyword arguments: threshold=0.3,
    exact_dedup=True, ...) say what to filter. Embeddings are cached per shard in `cache_dir` (default:
    OUTDIR/.curate-cache), computed by this process's share of ranks (RANK / WORLD_SIZE) and `workers` processes;
    with several ranks, rank 0 waits for the others and writes the output alone, the others return after
    embedding. The output is written all or nothing like make-shards': OUTDIR/curated-NNNNNN.tar, its
    _manifest.json (each kept sample's json member gains its `clip_score`), and curation_report.json / .png.
    """
    if options is None:
        options = CurationOptions.from_flat(**filters)
    elif filters:
        raise ConfigError("curate: give options= or keyword filters, not both")
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if options.needs_model and model is None:
        raise ConfigError("a CLIP-score threshold or fraction (or model-space near duplicates) needs a model (--model)")
    rank, world = dist_rank_world(rank, world_size)
    urls = input_shards(shards)
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{outdir}: exists and is not a folder")
    if any(not storage.is_remote(u) and Path(storage.local_path(u)).resolve().parent == out.resolve() for u in urls):
        raise ConfigError(f"{outdir}: is the input folder; write the curated dataset to another folder")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / CACHE_DIR
    scorer = load_scorer(model, pretrained, device) if isinstance(model, str) else model
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    embedded = embed_shards(urls, cache, scorer, rank=rank, world=world, workers=workers, batch_size=batch_size,
                            progress=progress)
    if rank != 0:
        return {"rank": rank, "embedded_shards": embedded}
    emb = _wait_for_embeddings(urls, cache, scorer, world, wait_timeout_s) if world > 1 else \
        load_embeddings(urls, cache, scorer)
    assert emb is not None
    timings["embed_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    contamination = {}
    space = options.near_space
    for bench in options.decontaminate:
        test = decon.test_set(bench, options.benchmark_root, scorer if space == "model" else None, cache, batch_size)
        train = emb.thumbs if space == "pixels" else emb.image
        assert train is not None
        contamination[bench] = decon.contaminated(train, test.vectors(space), options.decontam_threshold)
    timings["decontaminate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decision = decide(emb, options, contamination)
    timings["decide_s"] = time.perf_counter() - t0

    inputs = {"source": str(Path(shards).resolve()) if not storage.is_remote(shards) else shards,
              "shards": [storage.basename(u) for u in urls], "model": None if scorer is None else
              (list(scorer.spec) if scorer.spec else "in-memory"), "model_digest": None if scorer is None
              else scorer.digest, "options": asdict(options)}
    previous, _ = check_replaceable(out, inputs, replace)
    staging = out / INCOMPLETE
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    examples = Examples(decision, emb)
    t0 = time.perf_counter()
    try:
        written = _write_kept(urls, emb, decision, staging, options, progress, examples.offer)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    timings["write_s"] = time.perf_counter() - t0
    kept = int(decision.kept.sum())
    bad = [{"where": f"{storage.basename(urls[int(emb.shard[i])]) if emb.shard is not None else ''}: {emb.keys[i]}",
            "reason": r, "detail": d} for i, (r, d) in sorted(emb.bad.items())]
    by_reason: dict[str, int] = {}
    for b in bad:
        by_reason[b["reason"]] = by_reason.get(b["reason"], 0) + 1
    summary = {"samples_in": len(emb), "samples_out": kept, "removed": decision.removed,
               "flagged": decision.flagged, "score_threshold": decision.threshold, "near_groups": decision.near_groups,
               "contamination": decision.contamination, "embedded_shards": embedded, "cached_shards":
               len(urls) - embedded if world == 1 else None, "timings": {k: round(v, 3) for k, v in timings.items()}}
    manifest = {"version": MANIFEST_VERSION, "kind": "curated", "written_by": "vlpretrain curate", "inputs": inputs,
                "order": {"shuffled": False}, "samples": kept, "shards": written,
                "skipped": {"count": len(bad), "by_reason": by_reason, "rows": bad}, "curation": summary}
    swap_in(out, staging, previous, written, manifest)
    if report:
        write_report(out / REPORT, summary, emb, decision, examples)
    return summary
