"""`curate`: shards in, a curated dataset out (shards + manifest, all or nothing), plus a report.

The steps, in the order a sample meets them (the first that rejects it is its reason):
  unreadable -> caption rules -> decontamination (when removing) -> CLIP score -> exact duplicates -> near duplicates
Each rule is also counted on its own over every readable sample ("flagged"), so the report shows what each would
remove whatever the order. The score threshold of a top fraction is the score of the fraction's last sample among
all readable samples (DataComp's CLIP-score baseline ranks the whole pool). Duplicates are looked for among the
samples the other steps kept, and each group keeps its first sample.

Everything about images comes from the embedding pass (`curation.embed`), cached per shard and model, so a second
run with other thresholds only reads the cache and copies the kept samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from vlpretrain import storage
from vlpretrain.curation import decontaminate as decon
from vlpretrain.curation.dedup import exact_duplicates, near_duplicates
from vlpretrain.curation.embed import Embeddings, Scorer, embed_shards, load_embeddings, load_scorer
from vlpretrain.curation.read import Bad, input_shards, read_samples
from vlpretrain.curation.rules import CaptionRules, apply_rules
from vlpretrain.data.loader import dist_rank_world
from vlpretrain.data.writer import MANIFEST_VERSION, ShardSink, check_replaceable, swap_in
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import INCOMPLETE
from vlpretrain.progress import progress as progress_bar

log = logging.getLogger(__name__)

CACHE_DIR = ".curate-cache"  # inside the output folder unless a cache dir is given
REPORT = "curation_report"


@dataclass(frozen=True)
class CurationOptions:
    """What to filter: every step is off unless set (see `curate`)."""

    threshold: float | None = None  # keep pairs whose CLIP score is at least this
    fraction: float | None = None  # or keep this top fraction of pairs by CLIP score
    min_words: int | None = None
    max_words: int | None = None
    languages: tuple[str, ...] | None = None
    max_repeats: int | None = None
    boilerplate: bool = False
    max_repeated_words: float | None = None
    exact_dedup: bool = False
    near_dedup: float | None = None  # cosine at or above which two images are near duplicates
    near_space: str = "pixels"  # "pixels" (thumbnails: resizes, re-encodings) or "model" (image embeddings)
    decontaminate: tuple[str, ...] = ()  # benchmark names of the registry
    benchmark_root: str | None = None
    decontam_threshold: float = 0.985
    remove_contaminated: bool = False
    shard_size: int = 10000
    prefix: str = "curated"

    def __post_init__(self) -> None:
        if self.threshold is not None and self.fraction is not None:
            raise ConfigError("give a score threshold or a top fraction, not both")
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1 <= self.threshold <= 1):
            raise ConfigError(f"threshold: a CLIP score (cosine) in [-1, 1], got {self.threshold}")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ConfigError(f"fraction: in (0, 1], got {self.fraction}")
        for name in ("near_dedup", "decontam_threshold"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and -1 <= v <= 1):
                raise ConfigError(f"{name}: a cosine in [-1, 1], got {v}")
        if self.near_space not in ("pixels", "model"):
            raise ConfigError(f"near_space: 'pixels' or 'model', got {self.near_space!r}")
        if self.decontaminate and not self.benchmark_root:
            raise ConfigError("decontaminate: also give the benchmarks' data root (--benchmark-root)")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        self.rules()  # checks the caption rules' values

    def rules(self) -> CaptionRules:
        """The caption rules these options turn on."""
        return CaptionRules(self.min_words, self.max_words, self.languages, self.max_repeats, self.boilerplate,
                            self.max_repeated_words)

    @property
    def needs_model(self) -> bool:
        return self.threshold is not None or self.fraction is not None or self.near_space == "model"


@dataclass
class Decision:
    """Per sample, the step that dropped it (None: kept), the counts per step, and the score threshold used."""

    reasons: list[str | None]
    removed: dict[str, int]
    flagged: dict[str, int]
    threshold: float | None = None
    near_groups: int = 0
    contamination: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


def score_threshold(scores: np.ndarray, valid: np.ndarray, fraction: float) -> float:
    """The score of the last sample in the top `fraction` of the valid samples (ceil(fraction * n) of them)."""
    s = np.sort(scores[valid])[::-1]
    if len(s) == 0:
        return math.inf
    return float(s[max(1, math.ceil(fraction * len(s))) - 1])


def decide(emb: Embeddings, opts: CurationOptions,
           contamination: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> Decision:
    """Which samples to keep, and why each other one goes (a pure function of the embeddings and options)."""
    n = len(emb)
    reasons: list[str | None] = [None] * n
    removed: dict[str, int] = {}
    flagged: dict[str, int] = {}
    valid = emb.valid

    def drop(mask: np.ndarray, name: str) -> None:
        count = 0
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i] = name
                count += 1
        removed[name] = removed.get(name, 0) + count

    for i, (reason, _) in emb.bad.items():
        reasons[i] = reason
        removed[reason] = removed.get(reason, 0) + 1
    for name, mask in apply_rules(emb.captions, opts.rules(), valid).items():
        flagged[name] = int(mask.sum())
        drop(mask, name)
    report: dict[str, dict[str, Any]] = {}
    for bench, (flag, sims, rows) in (contamination or {}).items():
        flag = flag & valid
        flagged[f"contaminated:{bench}"] = int(flag.sum())
        top = np.flatnonzero(flag)[np.argsort(-sims[flag])][:20]
        report[bench] = {"flagged": int(flag.sum()), "removed": bool(opts.remove_contaminated),
                         "examples": [{"key": emb.keys[i], "shard": int(emb.shard[i]) if emb.shard is not None
                                       else 0, "test_index": int(rows[i]), "cosine": round(float(sims[i]), 4)}
                                      for i in top]}
        if opts.remove_contaminated:
            drop(flag, f"contaminated:{bench}")
    threshold = opts.threshold
    scores = emb.scores
    if opts.fraction is not None or threshold is not None:
        if scores is None:
            raise ConfigError("a score threshold or fraction needs a model (--model)")
        if opts.fraction is not None:
            threshold = score_threshold(scores, valid, opts.fraction)
        low = valid & ~(scores >= threshold)
        flagged["low score"] = int(low.sum())
        drop(low, "low score")
    near_groups = 0
    if opts.exact_dedup:
        alive = np.array([r is None for r in reasons])
        drop(exact_duplicates(emb.hashes, alive), "exact duplicate")
    if opts.near_dedup is not None:
        alive = np.array([r is None for r in reasons])
        vectors = emb.thumbs if opts.near_space == "pixels" else emb.image
        if vectors is None:
            raise ConfigError("near-duplicates in model space need a model (--model)")
        mask, near_groups = near_duplicates(vectors, alive, opts.near_dedup)
        drop(mask, "near duplicate")
    return Decision(reasons, removed, flagged, threshold, near_groups, report)


# ---------------------------------------------------------------------------------------------------------------
# the whole job


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
        names = {f.name for f in fields(CurationOptions)}
        unknown = sorted(set(filters) - names)
        if unknown:
            raise ConfigError(f"curate: unknown option {unknown[0]!r} (options: {', '.join(sorted(names))})")
        options = CurationOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in filters.items()})
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
    from vlpretrain.curation.report import Examples, write_report

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
