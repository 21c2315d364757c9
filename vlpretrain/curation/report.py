"""The curation report: a JSON summary and one page of plots (CLIP-score histograms, what each step removed, and
thumbnails of kept and dropped pairs with their captions)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlpretrain.curation.decide import Decision
from vlpretrain.curation.embed import Embeddings, decode

SHOWN = 8  # thumbnails of kept pairs, and of dropped ones


class Examples:
    """Picks which samples the report shows (kept ones evenly spread; dropped ones taking each reason in turn) and
    keeps their thumbnails as the output is written."""

    def __init__(self, decision: Decision, emb: Embeddings):
        kept = np.flatnonzero(decision.kept)
        self.kept = [int(i) for i in kept[np.linspace(0, len(kept) - 1, min(SHOWN, len(kept))).astype(int)]] \
            if len(kept) else []
        by_reason: dict[str, list[int]] = {}
        for i, r in enumerate(decision.reasons):
            if r is not None and i not in emb.bad:
                by_reason.setdefault(r, []).append(i)
        self.dropped: list[int] = []
        for k in range(SHOWN):
            for rows in by_reason.values():
                if k < len(rows) and len(self.dropped) < SHOWN:
                    self.dropped.append(rows[k])
        self.wanted = set(self.kept) | set(self.dropped)
        self.images: dict[int, Image.Image] = {}

    def offer(self, row: int, data: bytes, ext: str) -> None:
        """Keep a small copy of row's image if the report shows it."""
        if row in self.wanted:
            try:
                img = decode(data)
                img.thumbnail((96, 96))
                self.images[row] = img
            except Exception:  # shown as missing; the embedding pass already counted undecodable images
                pass


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_report(stem: Path, summary: dict[str, Any], emb: Embeddings, decision: Decision,
                 examples: Examples) -> tuple[Path, Path]:
    """Write STEM.json (the summary) and STEM.png (the page of plots); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _write_json(stem.with_suffix(".json"), summary)
    scores = emb.scores
    kept = decision.kept
    fig = plt.figure(figsize=(16, 12))
    grid = fig.add_gridspec(3, SHOWN, height_ratios=[1.3, 1, 1])
    ax = fig.add_subplot(grid[0, : SHOWN // 2])
    if scores is not None and np.isfinite(scores).any():
        finite = np.isfinite(scores)
        bins = np.linspace(np.nanmin(scores), np.nanmax(scores) + 1e-6, 50)
        ax.hist(scores[finite & kept], bins=bins, alpha=0.7, label=f"kept ({int((finite & kept).sum())})")
        ax.hist(scores[finite & ~kept], bins=bins, alpha=0.7, label=f"dropped ({int((finite & ~kept).sum())})")
        if decision.threshold is not None:
            ax.axvline(decision.threshold, color="k", ls="--", label=f"threshold {decision.threshold:.3f}")
        ax.set_xlabel("CLIP score (cosine of image and caption embeddings)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no model: no CLIP scores", ha="center", va="center")
    ax.set_title("CLIP-score histogram")
    ax = fig.add_subplot(grid[0, SHOWN // 2:])
    names = list(decision.removed) or ["(nothing removed)"]
    counts = [decision.removed.get(n, 0) for n in names]
    flagged = [decision.flagged.get(n, 0) for n in names]
    y = np.arange(len(names))
    for bars in (ax.barh(y - 0.2, counts, height=0.4, label="removed (first step to reject)"),
                 ax.barh(y + 0.2, flagged, height=0.4, label="flagged (rule on its own)")):
        ax.bar_label(bars, fontsize=7, padding=2)  # small counts beside large ones stay readable
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_title(f"{summary['samples_in']} samples in, {summary['samples_out']} kept")
    ax.legend(fontsize=8)
    for row_i, (title, rows) in enumerate((("kept", examples.kept), ("dropped", examples.dropped)), start=1):
        for j in range(SHOWN):
            ax = fig.add_subplot(grid[row_i, j])
            ax.axis("off")
            if j >= len(rows):
                continue
            i = rows[j]
            if i in examples.images:
                ax.imshow(examples.images[i], cmap="gray")
            score = "" if scores is None else f" s={scores[i]:.3f}"
            reason = "" if title == "kept" else f"\n[{decision.reasons[i]}]"
            ax.set_title(textwrap.fill(emb.captions[i][:80], 22) + f"\n{score}{reason}", fontsize=7)
    fig.suptitle("vlpretrain curate")
    fig.subplots_adjust(left=0.12, right=0.98, top=0.93, bottom=0.03, hspace=0.6, wspace=0.3)
    png = stem.with_suffix(".png")
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
    return stem.with_suffix(".json"), png
