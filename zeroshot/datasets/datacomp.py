"""DataComp's six tasks beyond CLIP_benchmark's: the WILDS sets, the fairness sets and WinoGAViL.

The WILDS and fairness sets are read from the webdataset exports DataComp's `download_evalsets.py` writes
(`wds_<key>_test`, see `base.datacomp_folder`): CLIP_benchmark's layout (wds.py) whose samples also carry
`<key>.npy`, the row of WILDS metadata fields the group metrics need; their class names and templates are the
export's own. Metric definitions: zeroshot/group_metrics.py.

WinoGAViL (association task: pick the k candidate images a cue word is associated with) has two layouts:
- "hf": the dataset as DataComp gets it. DataComp's eval_utils/wino_eval.py loads nlphuji/winogavil (test split,
  3,563 cues) with Hugging Face `datasets`; read here from its files with pyarrow (hf_tables.py): the hub's parquet
  files or a `save_to_disk` folder, one instance a row with columns cue (str), candidates (list of str),
  associations (list of str) and candidate_images (a list of `Image` values, struct<bytes, path>, in the order of
  candidates). The images are decoded when the model reads them.
- "wds": a webdataset layout of our own (DataComp exports no WinoGAViL shards), one instance per sample:
    <root>/test/*.tar      <key>.json  {"cue": "...", "candidates": ["bison", ...], "associations": ["beard", ...]}
                           <key>.<i>.webp|png|jpg|jpeg   candidate image i, in the order of "candidates"
    <root>/test/nshards.txt  optional, as in CLIP_benchmark's exports
In both, "candidates" and "associations" may also be the JSON text of a list (as the dataset's CSV holds them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vlpretrain.errors import DataError
from zeroshot.datasets import hf_tables
from zeroshot.datasets.base import Benchmark, Grouping, Layout, register
from zeroshot.datasets.wds import IMAGE_EXTS, ShardSamples, list_shards, shard_groups
from zeroshot.group_metrics import (
    camelyon17_metrics,
    dollar_street_metrics,
    fmow_metrics,
    geode_metrics,
    iwildcam_metrics,
)


@dataclass
class AssociationSet:
    """WinoGAViL instances opened from disk: every candidate image once, yielding (image, its instance), with each
    instance's cue and 0/1 truth over its candidates (in image order)."""

    images: Dataset
    cues: list[str]
    truths: list[torch.Tensor]
    format: str
    root: Path

    def __len__(self) -> int:
        return len(self.cues)


def _names(value: object, where: str, key: str) -> list[str]:
    """A list of strings, or the JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: {key!r} is neither a list nor the JSON text of one") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {key!r} must be a list of names")
    return value


class WinogavilLayout(Layout):
    """WinoGAViL as webdataset shards of our own design: per instance a .json (cue, candidates, associations) and
    its images."""

    name = "wds"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{split}/*.tar of <key>.json (cue, candidates, associations) with <key>.<i>.jpg candidate images"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return any((root / split).glob("*.tar"))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> AssociationSet:
        images, cues, truths = [], [], []
        for shard in list_shards(root / split):
            for key, files, info in _instances(shard):
                where = f"{shard}: sample {key!r}"
                if info is None:
                    raise DataError(f"{where} has no .json (cue, candidates, associations)")
                cue, candidates, truth = _instance(where, info.get("cue"), info.get("candidates"),
                                                   info.get("associations"))
                for i in range(len(candidates)):
                    member = next((files[f"{i}.{e}"] for e in IMAGE_EXTS if f"{i}.{e}" in files), None)
                    if member is None:
                        raise DataError(f"{where}: candidate {i} ({candidates[i]!r}) has no image <key>.{i}.jpg|png|webp")
                    images.append((shard, member.offset_data, member.size, len(cues)))
                cues.append(cue)
                truths.append(truth)
        if not cues:
            raise DataError(f"{root / split}: the shards hold no WinoGAViL instances")
        return AssociationSet(ShardSamples(images, transform), cues, truths, self.name, root)


def _instance(where: str, cue: object, candidates: object,
              associations: object) -> tuple[str, list[str], torch.Tensor]:
    """One instance's cue, candidate names and 0/1 truth over the candidates, checked; errors name `where`."""
    if not isinstance(cue, str) or not cue.strip():
        raise DataError(f"{where}: missing 'cue'")
    names = _names(candidates, where, "candidates")
    chosen = set(_names(associations, where, "associations"))
    return cue, names, torch.tensor([c in chosen for c in names], dtype=torch.bool)


COLUMNS = ("cue", "candidates", "associations", "candidate_images")


class WinogavilTableLayout(Layout):
    """nlphuji/winogavil as Hugging Face `datasets` stores it (what DataComp evaluates): parquet or save_to_disk
    files, one instance a row, read with pyarrow."""

    name = "hf"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{hf_tables.expected(split)} with columns {', '.join(COLUMNS)}"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return bool(hf_tables.split_files(root, split))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> AssociationSet:
        tables = [hf_tables.SplitTable(path) for path in hf_tables.split_files(root, split)]
        images, cues, truths = [], [], []
        for f, table in enumerate(tables):
            table.require(COLUMNS, "WinoGAViL")
            text = {c: table.column(c) for c in COLUMNS[:3]}
            counts = table.image_counts("candidate_images")
            for row in range(table.num_rows):
                where = f"{table.path}: row {row}"
                cue, candidates, truth = _instance(where, *(text[c][row] for c in COLUMNS[:3]))
                if counts[row] != len(candidates):
                    raise DataError(f"{where}: {counts[row] or 0} candidate_images for {len(candidates)} candidates")
                images.extend((f, row, i, len(cues)) for i in range(len(candidates)))
                cues.append(cue)
                truths.append(truth)
        if not cues:
            raise DataError(f"{root}: the {split} files hold no WinoGAViL instances")
        return AssociationSet(hf_tables.TableImages(tables, "candidate_images", images, transform), cues, truths,
                              self.name, root)


def _instances(shard: Path):
    """(key, {extension: tar member}, parsed .json or None) of every sample of a shard, in order."""
    for key, files, read in shard_groups(shard):
        info = None
        if "json" in files:
            try:
                info = json.loads(read(files["json"]))
            except ValueError as e:
                raise DataError(f"{shard}: sample {key!r} has an unreadable .json ({e})") from None
            if not isinstance(info, dict):
                raise DataError(f"{shard}: sample {key!r}: the .json must be an object")
        yield key, files, info


WILDS = "DataComp eval_utils/wilds_eval.py"
FAIRNESS = "DataComp eval_utils/fairness_eval.py"

register(Benchmark("winogavil", (WinogavilTableLayout(), WinogavilLayout()), metric="jaccard_score_10-12",
                   task="association", datacomp="misc/winogavil",
                   notes="WinoGAViL (nlphuji/winogavil test split, 3,563 cues) as DataComp's eval_utils/wino_eval.py "
                         "scores it; cue prompt 'A/An <cue>'"))
register(Benchmark("iwildcam", metric="F1-macro_all", datacomp="wilds/iwildcam", notes=WILDS,
                   grouping=Grouping(("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"),
                                     iwildcam_metrics, ("F1-macro_all", "recall-macro_all", "acc_avg"))))
register(Benchmark("camelyon17", metric="top1", datacomp="wilds/camelyon17", notes=WILDS,
                   grouping=Grouping(("hospital", "slide", "y"), camelyon17_metrics, ("acc_avg", "acc_wg"))))
register(Benchmark("fmow", metric="acc_worst_region", datacomp="wilds/fmow", notes=WILDS,
                   grouping=Grouping(("region", "year", "y"), fmow_metrics,
                                     ("acc_worst_region", "acc_worst_year", "acc_avg"))))
register(Benchmark("dollar-street", metric="acc_top5_wg", aliases=("dollar_street",),
                   datacomp="fairness/dollar_street", notes=FAIRNESS,
                   grouping=Grouping(("income_ds", "income_meta", "region"), dollar_street_metrics,
                                     ("acc_top5_wg", "acc_top5_avg"))))
register(Benchmark("geode", metric="acc_wg", datacomp="fairness/geode", notes=FAIRNESS,
                   grouping=Grouping(("region", "country"), geode_metrics, ("acc_wg", "acc_avg"))))
