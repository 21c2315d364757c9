"""Image-caption selection layouts (compositionality), read from the files CLIP_benchmark reads:

    sugar_crepe   <root>/<subset>.json (RAIVNLab/sugar-crepe's data/<subset>.json: {"<id>": {"filename",
                  "caption", "negative_caption"}}) with the COCO images in <root>/val2017/; <root> may also be a
                  folder holding a sugar_crepe/ sub-folder laid out so
    winoground    facebook/winoground's repository files: [data/]examples.jsonl (one {"id", "caption_0",
                  "caption_1", "image_0", "image_1", ...} a line, image names without extension) with the images
                  in [data/]images/<name>.png or still in [data/]images.zip

CLIP_benchmark reads Winoground through the Hugging Face `datasets` cache; these are the files behind it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from vlpretrain.errors import DataError
from vlpretrain.formats import to_rgb
from zeroshot.datasets.base import Benchmark, Layout, SelectionSet
from zeroshot.datasets.common import ImageFiles

SUGAR_CREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


class ZipImages(Dataset):
    """Images read from members of a zip file, labelled by their position (each read opens the zip)."""

    def __init__(self, archive: Path, members: list[str], transform: Callable | None = None):
        self.archive, self.members, self.transform = archive, members, transform

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int):
        try:
            with zipfile.ZipFile(self.archive) as z:
                image = to_rgb(Image.open(io.BytesIO(z.read(self.members[i]))))
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.archive}: cannot read image {self.members[i]} ({e})") from None
        return (self.transform(image) if self.transform else image), i


class SugarCrepeLayout(Layout):
    """CLIP_benchmark's sugar_crepe/<subset>: the subset's json beside COCO's val2017/ folder."""

    name = "sugar_crepe"

    def __init__(self, subset: str):
        assert subset in SUGAR_CREPE_SUBSETS, subset
        self.subset = subset

    def _folder(self, root: Path) -> Path | None:
        return next((d for d in (root, root / "sugar_crepe") if (d / f"{self.subset}.json").is_file()), None)

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{self.subset}.json (RAIVNLab/sugar-crepe) and val2017/*.jpg"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return split == "test" and self._folder(root) is not None

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> SelectionSet:
        folder = self._folder(root)
        assert folder is not None, "open() is only called after detect()"
        path = folder / f"{self.subset}.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            rows = [(str(e["filename"]), str(e["caption"]), str(e["negative_caption"])) for e in entries.values()]
        except (ValueError, AttributeError, TypeError, KeyError) as e:
            raise DataError(f"{path}: not SugarCrepe's {{id: {{filename, caption, negative_caption}}}} "
                            f"({type(e).__name__}: {e})") from None
        if not rows:
            raise DataError(f"{path}: no entries")
        images = folder / "val2017"
        missing = [name for name, _, _ in rows if not (images / name).is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} of its images are missing from {images}, e.g. {missing[0]}")
        dataset = ImageFiles([images / name for name, _, _ in rows], list(range(len(rows))), transform)
        captions = [c for _, pos, neg in rows for c in (pos, neg)]
        return SelectionSet(dataset, captions, 1, 2, self.name, folder)


class WinogroundLayout(Layout):
    """facebook/winoground's examples.jsonl with its images (a folder, or the zip as published)."""

    name = "winoground"
    FILES = ("examples.jsonl", "data/examples.jsonl", "metadata.jsonl", "data/metadata.jsonl")

    def _examples(self, root: Path) -> Path | None:
        return next((root / f for f in self.FILES if (root / f).is_file()), None)

    def expected(self, bench: Benchmark, split: str) -> str:
        return "[data/]examples.jsonl and [data/]images/*.png or [data/]images.zip (facebook/winoground)"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return split == "test" and self._examples(root) is not None

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> SelectionSet:
        path = self._examples(root)
        assert path is not None, "open() is only called after detect()"
        names, captions = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                names += [_png(row["image_0"]), _png(row["image_1"])]
                captions += [str(row["caption_0"]), str(row["caption_1"])]
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}:{n}: expected caption_0, caption_1, image_0, image_1 "
                                f"({type(e).__name__}: {e})") from None
        if not names:
            raise DataError(f"{path}: no examples")
        return SelectionSet(_winoground_images(path.parent, names, transform), captions, 2, 2, self.name, root)


def _png(name: object) -> str:
    name = str(name)
    return name if Path(name).suffix else f"{name}.png"


def _winoground_images(folder: Path, names: list[str], transform: Callable | None) -> Dataset:
    """The images as files under images/ when extracted, else as members of images.zip."""
    images = folder / "images"
    if images.is_dir():
        missing = [n for n in names if not (images / n).is_file()]
        if missing:
            raise DataError(f"{images}: {len(missing)} Winoground images are missing, e.g. {missing[0]}")
        return ImageFiles([images / n for n in names], list(range(len(names))), transform)
    archive = folder / "images.zip"
    if not archive.is_file():
        raise DataError(f"{folder}: Winoground images not found; expected images/*.png or images.zip")
    try:
        with zipfile.ZipFile(archive) as z:
            members = {Path(m).name: m for m in z.namelist() if not m.endswith("/")}
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a readable zip file ({e})") from None
    missing = [n for n in names if n not in members]
    if missing:
        raise DataError(f"{archive}: {len(missing)} Winoground images are missing, e.g. {missing[0]}")
    return ZipImages(archive, [members[n] for n in names], transform)
