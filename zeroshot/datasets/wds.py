"""CLIP_benchmark's webdataset layout, which every benchmark can be read from.

    <root>/classnames.txt                          one class name a line, in label order
    <root>/zeroshot_classification_templates.txt   one template a line with {c} (optional: the registry's otherwise)
    <root>/test/*.tar                              samples <key>.webp|png|jpg|jpeg + <key>.cls (the label as text)
    <root>/test/nshards.txt                        optional: shards 0..n-1.tar, as CLIP_benchmark reads them
    <root>/dataset_type.txt                        "multilabel": labels are <key>.npy 0/1 vectors, not .cls

A benchmark with a grouping (DataComp's WILDS and fairness sets) also reads each sample's <key>.npy as its row of
metadata fields (WILDS' metadata array: e.g. FMoW's region, year, y), beside the .cls label.

The shards are indexed once (tar headers only) into a map-style dataset that reads each image by offset, so it
works with DataLoader workers, subsets and progress bars like the other layouts. Class names and templates found
beside the shards win over the registry's English ones, as in CLIP_benchmark, so scores match on the same files;
in another language the registry's class names and templates of that language are used (the export has none).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlpretrain.errors import DataError
from vlpretrain.formats import to_rgb
from zeroshot.datasets.base import (
    CLASSIFICATION_TASKS,
    DEFAULT_LANGUAGE,
    Benchmark,
    EvalSet,
    Layout,
    add_generic_layouts,
)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's preference order when a sample has several
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def list_shards(folder: Path) -> list[Path]:
    nshards = folder / "nshards.txt"
    if nshards.is_file():
        try:
            n = int(nshards.read_text().strip())
        except ValueError:
            raise DataError(f"{nshards}: expected the number of shards, got {nshards.read_text()[:40]!r}") from None
        shards = [folder / f"{i}.tar" for i in range(n)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"{folder}: nshards.txt says {n} shards but {', '.join(missing[:3])} "
                            f"{'is' if len(missing) == 1 else 'are'} missing")
        return shards
    return sorted(folder.glob("*.tar"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_groups(shard: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], Callable[[tarfile.TarInfo], bytes]]]:
    """(key, {extension: tar member}, read) of every sample of one shard, in order, grouped by webdataset's key rule;
    `read(member)` gives a member's bytes. An unreadable tar is one DataError naming the shard."""

    def unreadable(e: tarfile.TarError) -> DataError:
        return DataError(f"{shard}: not a readable tar file ({e})")

    try:
        with tarfile.open(shard, "r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = _split_key(member.name)
                    groups.setdefault(key, {})[ext] = member

            def read(member: tarfile.TarInfo) -> bytes:
                try:
                    return tar.extractfile(member).read()  # type: ignore[union-attr]
                except tarfile.TarError as e:
                    raise unreadable(e) from None

            for key, files in groups.items():
                yield key, files, read
    except tarfile.TarError as e:
        raise unreadable(e) from None


def shard_samples(shard: Path, image_exts: tuple[str, ...] = IMAGE_EXTS) -> Iterator[tuple[str, tarfile.TarInfo,
                                                                                         dict[str, bytes]]]:
    """(key, image member, {other extension: bytes}) of every sample of one shard, in order; the image is the first
    of `image_exts` the sample has (a sample without one is an error naming the shard and key)."""
    for key, files, read in shard_groups(shard):
        image = next((files[e] for e in image_exts if e in files), None)
        if image is None:
            raise DataError(f"{shard}: sample {key!r} has no image ({'/'.join(image_exts)}), only {sorted(files)}")
        yield key, image, {e: read(m) for e, m in files.items() if m is not image and e not in image_exts}


def _label(shard: Path, key: str, files: dict[str, bytes], ext: str) -> int | tuple[int, ...]:
    """A sample's .cls class index, or its .npy 0/1 vector of classes present (multi-label)."""
    if ext not in files:
        raise DataError(f"{shard}: sample {key!r} needs a .{ext} label, has {sorted(files)}")
    if ext == "npy":
        try:
            vector = np.load(io.BytesIO(files[ext]), allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{shard}: sample {key!r} has an unreadable .npy label ({e})") from None
        return tuple(int(v) for v in np.asarray(vector).reshape(-1))
    text = files[ext].decode().strip()
    if not text.lstrip("-").isdigit():
        raise DataError(f"{shard}: sample {key!r} has label {text[:20]!r}, expected an integer")
    return int(text)


def index_shards(shards: list[Path], label_ext: str = "cls") -> list[tuple[Path, int, int, int | tuple[int, ...]]]:
    """(shard, byte offset, size, label) of every sample's image, in shard order."""
    return [(shard, image.offset_data, image.size, _label(shard, key, files, label_ext))
            for shard in shards for key, image, files in shard_samples(shard)]


def index_with_metadata(shards: list[Path], bench: Benchmark) -> tuple[list[tuple[Path, int, int, int]],
                                                                       list[tuple[int, ...]]]:
    """(shard, byte offset, size, .cls label) of every sample's image and the first fields of its .npy metadata
    row that `bench`'s grouping names, in shard order."""
    assert bench.grouping is not None
    fields = bench.grouping.fields
    samples, rows = [], []
    for shard in shards:
        for key, image, files in shard_samples(shard):
            if "npy" not in files:
                raise DataError(f"{shard}: sample {key!r} has no .npy metadata row (the fields its group metrics "
                                f"need), only {sorted(files)}")
            row = _label(shard, key, files, "npy")
            if len(row) < len(fields):  # type: ignore[arg-type]
                raise DataError(f"{shard}: sample {key!r} has {len(row)} metadata fields, {bench.name} needs "  # type: ignore
                                f"{len(fields)} ({', '.join(fields)})")
            samples.append((shard, image.offset_data, image.size, _label(shard, key, files, "cls")))
            rows.append(row[:len(fields)])  # type: ignore[index]
    return samples, rows  # type: ignore[return-value]


class ShardSamples(Dataset):
    """Images read straight from tar shards by byte offset (each read opens the shard, so workers share nothing)."""

    def __init__(self, samples: list[tuple[Path, int, int, int]], transform: Callable | None = None):
        # labels are class indices, or sample indices where the targets live beside (multi-label, retrieval)
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        shard, offset, size, label = self.samples[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            image = to_rgb(Image.open(io.BytesIO(data)))
        except OSError as e:
            raise DataError(f"{shard}: cannot decode the image at byte {offset} ({e})") from None
        return (self.transform(image) if self.transform else image), label


class WebDatasetLayout(Layout):
    """CLIP_benchmark's `clip_benchmark_export_wds` output, for any benchmark."""

    name = "wds"

    def expected(self, bench: Benchmark, split: str) -> str:
        labels = ", .npy labels" if bench.task == "multilabel" else ""
        return f"{CLASSNAMES} and {split}/*.tar (CLIP_benchmark webdataset{labels})"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return (root / CLASSNAMES).is_file() or any((root / split).glob("*.tar"))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet:
        missing = [str(root / p) for p in (CLASSNAMES,) if not (root / p).is_file()]
        shards = list_shards(root / split) if (root / split).is_dir() else []
        if not shards:
            missing.append(str(root / split / "*.tar"))
        if missing:
            raise DataError(f"{root}: incomplete CLIP_benchmark webdataset for {bench.name}; missing {', '.join(missing)}")
        classnames = _read_lines(root / CLASSNAMES)
        if (root / TEMPLATES).is_file():
            templates = _read_lines(root / TEMPLATES)
        elif bench.from_export:
            raise DataError(f"{root}: {bench.name} takes its prompts from the export; missing {root / TEMPLATES}")
        else:
            templates = bench.templates
        if bench.language != DEFAULT_LANGUAGE:  # the export's files are English: the language's own prompts win
            if len(classnames) != len(bench.classnames):
                raise DataError(f"{root / CLASSNAMES}: {len(classnames)} classes, {bench.name}'s {bench.language} "
                                f"class names {len(bench.classnames)}")
            classnames, templates = bench.classnames, bench.templates
        if bench.grouping is not None:
            return self._grouped(bench, root, split, shards, classnames, templates, transform)
        multilabel = bench.task == "multilabel"
        samples = index_shards(shards, "npy" if multilabel else "cls")
        if not samples:
            raise DataError(f"{root / split}: the shards hold no samples")
        if multilabel:
            bad = next((s for s in samples if len(s[3]) != len(classnames)), None)  # type: ignore[arg-type]
            if bad is not None:
                raise DataError(f"{bad[0]}: a .npy label has {len(bad[3])} entries, {root / CLASSNAMES} "  # type: ignore
                                f"{len(classnames)} classes")
            targets = torch.tensor([s[3] for s in samples], dtype=torch.long)
            indexed = [(shard, offset, size, i) for i, (shard, offset, size, _) in enumerate(samples)]
            return EvalSet(ShardSamples(indexed, transform), classnames, templates, self.name, root, targets)
        bad = next((s for s in samples if not 0 <= s[3] < len(classnames)), None)  # type: ignore[operator]
        if bad is not None:
            raise DataError(f"{bad[0]}: label {bad[3]} is outside the {len(classnames)} classes of {root / CLASSNAMES}")
        return EvalSet(ShardSamples(samples, transform), classnames, templates, self.name, root)  # type: ignore

    def _grouped(self, bench: Benchmark, root: Path, split: str, shards: list[Path], classnames: list[str],
                 templates: list[str], transform: Callable | None) -> EvalSet:
        """Samples with a .cls label and a .npy metadata row of the grouping's fields."""
        samples, rows = index_with_metadata(shards, bench)
        if not samples:
            raise DataError(f"{root / split}: the shards hold no samples")
        bad = next((s for s in samples if not 0 <= s[3] < len(classnames)), None)
        if bad is not None:
            raise DataError(f"{bad[0]}: label {bad[3]} is outside the {len(classnames)} classes of {root / CLASSNAMES}")
        metadata = torch.tensor(rows, dtype=torch.long)
        return EvalSet(ShardSamples(samples, transform), classnames, templates, self.name, root,  # type: ignore
                       metadata=metadata, grouping=bench.grouping)


add_generic_layouts(CLASSIFICATION_TASKS, WebDatasetLayout)
