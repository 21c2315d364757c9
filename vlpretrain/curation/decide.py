"""What to keep: the curation options and `decide`, a pure function from a dataset's embeddings to each sample's
fate.

The steps, in the order a sample meets them (the first that rejects it is its reason):
  unreadable -> caption rules -> decontamination (when removing) -> CLIP score -> exact duplicates -> near duplicates
Each rule is also counted on its own over every readable sample ("flagged"), so the report shows what each would
remove whatever the order. The score threshold of a top fraction is the score of the fraction's last sample among
all readable samples (DataComp's CLIP-score baseline ranks the whole pool). Duplicates are looked for among the
samples the other steps kept, and each group keeps its first sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from vlpretrain.curation.dedup import APPROXIMATE_ABOVE, exact_duplicates, near_duplicates
from vlpretrain.curation.embed import NEAR_COSINE, Embeddings
from vlpretrain.curation.rules import CaptionRules, apply_rules
from vlpretrain.errors import ConfigError


@dataclass(frozen=True)
class CurationOptions:
    """What to filter: every step is off unless set (see `curate`)."""

    threshold: float | None = None  # keep pairs whose CLIP score is at least this
    fraction: float | None = None  # or keep this top fraction of pairs by CLIP score
    rules: CaptionRules = field(default_factory=CaptionRules)  # the caption rules (each off unless set)
    exact_dedup: bool = False
    near_dedup: float | None = None  # cosine at or above which two images are near duplicates
    near_space: str = "pixels"  # "pixels" (thumbnails: resizes, re-encodings) or "model" (image embeddings)
    near_approximate_above: int = APPROXIMATE_ABOVE  # more candidates than this: an approximate (IVF) search
    decontaminate: tuple[str, ...] = ()  # benchmark names of the registry
    benchmark_root: str | None = None
    decontam_threshold: float = NEAR_COSINE
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
        if self.near_approximate_above < 0:
            raise ConfigError(f"near_approximate_above: must be >= 0, got {self.near_approximate_above}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")

    @classmethod
    def from_flat(cls, **values: Any) -> CurationOptions:
        """Options from one flat set of names, the caption rules' among them (min_words=2, fraction=0.3, ...), as
        `curate` and the CLI take them; an unknown name is a ConfigError listing the known ones."""
        rule_names = {f.name for f in fields(CaptionRules)}
        names = ({f.name for f in fields(cls)} - {"rules"}) | rule_names
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"curate: unknown option {unknown[0]!r} (options: {', '.join(sorted(names))})")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        rules = CaptionRules(**{k: v for k, v in values.items() if k in rule_names})
        return cls(rules=rules, **{k: v for k, v in values.items() if k not in rule_names})

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
    for name, mask in apply_rules(emb.captions, opts.rules, valid).items():
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
        mask, near_groups = near_duplicates(vectors, alive, opts.near_dedup, opts.near_approximate_above)
        drop(mask, "near duplicate")
    return Decision(reasons, removed, flagged, threshold, near_groups, report)
