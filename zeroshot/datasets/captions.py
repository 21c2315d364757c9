"""Captioned-image layouts for zero-shot retrieval: each image once, with all of its captions.

Per benchmark (the files CLIP_benchmark reads, from github.com/mehdidc/retrieval_annotations):
    flickr8k, flickr30k   <root>/flickr{8k,30k}_{split}_karpathy.txt (a header line, then `image,caption` per
                          caption) and the images in <root> itself (or its Images/ or flickr30k-images/ folder)
    mscoco                <root>/coco_{split}_karpathy.json (COCO captions format) with <root>/val2014/*.jpg
                          (train2014/ for the train split)
For every retrieval benchmark (GENERIC_LAYOUTS, tried after the benchmark's own):
    wds                   CLIP_benchmark's webdataset export: <root>/{split}/*.tar of <key>.webp|png|jpg + <key>.txt
                          holding the image's captions one per line (dataset_type.txt says "retrieval")
    shards                `vlpretrain make-shards` output: <root>/*.tar (+ _manifest.json) of <key>.jpg|png|... with
                          <key>.json whose "captions" lists every caption (<key>.txt, the first one, as a fallback)
    coco                  a COCO captions json as make-shards reads it: <root>/[annotations/]captions_*.json with
                          its images in the folder named after it (captions_val2017.json -> val2017/) or beside it
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vlpretrain.errors import DataError
from zeroshot.datasets.base import Benchmark, CaptionSet, Layout, add_generic_layouts
from zeroshot.datasets.common import ImageFiles
from zeroshot.datasets.wds import IMAGE_EXTS, ShardSamples, list_shards, shard_samples

log = logging.getLogger(__name__)

SHARD_IMAGE_EXTS = (*IMAGE_EXTS, "gif", "bmp", "tif", "tiff", "ppm", "pgm")  # make-shards keeps an image's encoding
MANIFEST = "_manifest.json"  # vlpretrain.data.writer's


def caption_set(images: Sequence, captions: Iterable[Sequence[str]], transform: Callable | None, format: str,
                root: Path, where: str) -> CaptionSet:
    """A CaptionSet from per-image sources (paths, or ShardSamples entries) and per-image caption lists; images
    without a caption are left out (they could be neither found nor described), with a warning."""
    kept, texts, owner, dropped = [], [], [], 0
    for image, caps in zip(images, captions, strict=True):
        caps = [c.strip() for c in caps if c and c.strip()]
        if not caps:
            dropped += 1
            continue
        texts += caps
        owner += [len(kept)] * len(caps)
        kept.append(image)
    if dropped:
        log.warning("%s: %d images without a caption left out", where, dropped)
    if not kept:
        raise DataError(f"{where}: no captioned images")
    if isinstance(kept[0], tuple):  # (shard, offset, size, _) entries: relabel with the kept image's index
        dataset = ShardSamples([(s, o, n, i) for i, (s, o, n, _) in enumerate(kept)], transform)
    else:
        dataset = ImageFiles(kept, list(range(len(kept))), transform)
    return CaptionSet(dataset, texts, owner, format, root)


class FlickrLayout(Layout):
    """CLIP_benchmark's Flickr8k/30k: a Karpathy-split captions file beside (or above) a flat image folder."""

    name = "karpathy"
    IMAGE_DIRS = ("", "Images", "images", "flickr30k-images", "flickr30k_images", "Flicker8k_Dataset")

    def __init__(self, prefix: str):
        self.prefix = prefix

    def _file(self, root: Path, split: str) -> Path:
        return root / f"{self.prefix}_{split}_karpathy.txt"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{self._file(Path(), split)} and the images beside it (or in Images/)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._file(root, split).is_file()

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        path = self._file(root, split)
        by_image: dict[str, list[str]] = {}
        lines = path.read_text(encoding="utf-8").splitlines()[1:]  # the first line is the `image,caption` header
        for n, line in enumerate(lines, 2):
            if not line.strip():
                continue
            image, sep, caption = line.partition(",")  # captions may hold commas, file names do not
            if not sep:
                raise DataError(f"{path}:{n}: expected `image,caption`, got {line[:60]!r}")
            by_image.setdefault(image.strip(), []).append(caption)
        if not by_image:
            raise DataError(f"{path}: no `image,caption` lines after the header")
        first = next(iter(by_image))
        folder = next((root / d for d in self.IMAGE_DIRS if (root / d / first).is_file()), None)
        if folder is None:
            raise DataError(f"{path}: image {first} is in none of {', '.join(str(root / d) for d in self.IMAGE_DIRS)}")
        missing = [name for name in by_image if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} images are missing from {folder}, e.g. {missing[0]}")
        return caption_set([folder / name for name in by_image], by_image.values(), transform, self.name, root,
                           str(path))


def _read_coco(path: Path, image_root: Path | None, transform: Callable | None, format: str,
               root: Path) -> CaptionSet:
    """A COCO captions json read by make-shards' own reader (one COCO parser), as one CaptionSet."""
    from vlpretrain.data.sources import Record, SourceOptions, read_coco

    records = [r for r in read_coco(path, SourceOptions(image_root=str(image_root) if image_root else None)).items
               if isinstance(r, Record)]
    missing = [r.image for r in records if not Path(str(r.image)).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} of its images are missing, e.g. {missing[0]}")
    return caption_set([Path(str(r.image)) for r in records], [r.captions for r in records], transform, format,
                       root, str(path))


class CocoKarpathyLayout(Layout):
    """CLIP_benchmark's MSCOCO: coco_{split}_karpathy.json (COCO captions format) with val2014/ (or train2014/)."""

    name = "karpathy"

    def _file(self, root: Path, split: str) -> Path:
        return root / f"coco_{split}_karpathy.json"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{self._file(Path(), split)} and {'train' if split == 'train' else 'val'}2014/*.jpg"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._file(root, split).is_file()

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        images = root / ("train2014" if split == "train" else "val2014")
        return _read_coco(self._file(root, split), images if images.is_dir() else root, transform, self.name, root)


class CocoCaptionsLayout(Layout):
    """Any COCO captions json with its image folder, found and resolved as `vlpretrain make-shards --format coco`."""

    name = "coco"
    WANTED = {"test": ("test", "val"), "train": ("train",)}

    def _file(self, root: Path, split: str) -> Path | None:
        files = sorted([*root.glob("captions_*.json"), *root.glob("annotations/captions_*.json")])
        for word in self.WANTED[split]:
            match = next((f for f in files if word in f.stem), None)
            if match is not None:
                return match
        return files[0] if len(files) == 1 else None

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"[annotations/]captions_*{self.WANTED[split][-1]}*.json and its image folder"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._file(root, split) is not None

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        path = self._file(root, split)
        assert path is not None, "open() is only called after detect()"
        return _read_coco(path, None, transform, self.name, root)


def _captions_of(shard: Path, key: str, files: dict[str, bytes], from_json: bool) -> list[str]:
    """A sample's captions: its .json "captions" list (our shards) or its .txt lines (CLIP_benchmark's)."""
    if from_json and "json" in files:
        try:
            caps = json.loads(files["json"]).get("captions")
        except (ValueError, AttributeError) as e:
            raise DataError(f"{shard}: sample {key!r} has an unreadable .json ({e})") from None
        if isinstance(caps, list) and all(isinstance(c, str) for c in caps):
            return caps
    if "txt" not in files:
        raise DataError(f"{shard}: sample {key!r} has no captions (.txt, or .json \"captions\"), has {sorted(files)}")
    return files["txt"].decode("utf-8").splitlines()


def _shard_caption_set(shards: list[Path], from_json: bool, transform: Callable | None, format: str,
                       root: Path, where: Path) -> CaptionSet:
    entries, captions = [], []
    for shard in shards:
        for key, image, files in shard_samples(shard, SHARD_IMAGE_EXTS):
            entries.append((shard, image.offset_data, image.size, len(entries)))
            captions.append(_captions_of(shard, key, files, from_json))
    return caption_set(entries, captions, transform, format, root, str(where))


class WdsCaptionsLayout(Layout):
    """CLIP_benchmark's webdataset export of a retrieval set: {split}/*.tar of images with .txt caption lines."""

    name = "wds"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{split}/*.tar of images with .txt captions (CLIP_benchmark webdataset, dataset_type.txt: retrieval)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return (root / "dataset_type.txt").is_file() or any((root / split).glob("*.tar"))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        kind = root / "dataset_type.txt"
        if kind.is_file() and kind.read_text().strip().lower() != "retrieval":
            raise DataError(f"{kind}: says {kind.read_text().strip()!r}; {bench.name} needs a retrieval export")
        shards = list_shards(root / split) if (root / split).is_dir() else []
        if not shards:
            raise DataError(f"{root}: incomplete CLIP_benchmark webdataset for {bench.name}; missing "
                            f"{root / split / '*.tar'}")
        return _shard_caption_set(shards, False, transform, self.name, root, root / split)


class ShardsLayout(Layout):
    """A folder of our own shards (`vlpretrain make-shards` output), every caption from each sample's .json."""

    name = "shards"

    def _shards(self, root: Path) -> list[Path]:
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                names = [s["name"] for s in json.loads(manifest.read_text())["shards"]]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{manifest}: not a make-shards manifest ({type(e).__name__}: {e})") from None
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise DataError(f"{manifest}: lists {missing[0]}, which is not in {root}")
            return [root / n for n in names]
        return list_shards(root)

    def expected(self, bench: Benchmark, split: str) -> str:
        return "*.tar (+ _manifest.json) written by `vlpretrain make-shards`"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return (root / MANIFEST).is_file() or any(root.glob("*.tar"))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        shards = self._shards(root)
        if not shards:
            raise DataError(f"{root / MANIFEST}: lists no shards")
        return _shard_caption_set(shards, True, transform, self.name, root, root)


GENERIC_LAYOUTS: tuple[type[Layout], ...] = (WdsCaptionsLayout, ShardsLayout, CocoCaptionsLayout)
add_generic_layouts(["retrieval"], *GENERIC_LAYOUTS)
