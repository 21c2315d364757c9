"""Multilingual image-text retrieval as CLIP_benchmark reads it: Crossmodal-3600, XTD10 and multilingual COCO.

Each set has one caption per image in the chosen language (Crossmodal-3600: the first of that language's captions).
Read, in the order tried, from:

    annotations   CLIP_benchmark's own file for the language, written by its first run:
                  <root>/<prefix>-<code>.json = {"image_paths": [...], "annotations": [one caption per image]}
                  (crossmodal3600_captions-<code>.json, xtd10-<code>.json, multilingual_mscoco_captions-<code>.json)
    xm3600        Crossmodal-3600 as published: <root>/xm3600/captions.jsonl (one image a line: "image/key" and per
                  language {"caption": [...]}) with <root>/xm3600/images/<key>.jpg
    xtd           XTD10's files (adobe-research/Cross-lingual-Test-Dataset-XTD10): test_image_names.txt and
                  test_1kcaptions_<code>.txt, line i the caption of image i, either side by side in <root>/<folder>/
                  (or <root>) or in the repository's own folders (XTD10/, MIC/ for de and fr, STAIR/ for jp), with
                  the images in <root>/<folder>/images/ (folder: xtd10 or multilingual_mscoco)

<root> is CLIP_benchmark's dataset root; its data folder itself (xm3600/, xtd10/, multilingual_mscoco/) works too.
Images named by the annotations but missing on disk are left out with a warning, as CLIP_benchmark does, so both
score the same pairs. XTD10 and multilingual COCO are the same 1000 COCO images; CLIP_benchmark keeps both names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from vlpretrain.errors import DataError
from zeroshot.datasets.base import Benchmark, CaptionSet, Layout
from zeroshot.datasets.captions import caption_set

log = logging.getLogger(__name__)

# the language codes of CLIP_benchmark's XTD10 readers where they differ from ISO 639-1 (ours)
XTD_CODES = {"ja": "jp"}
XTD_LANGUAGES = ("de", "en", "es", "fr", "it", "ja", "ko", "pl", "ru", "tr", "zh")
XTD_REPO_FOLDERS = {"de": "MIC", "fr": "MIC", "jp": "STAIR"}  # every other language's file is in XTD10/
XM3600_LANGUAGES = ("ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu",
                    "id", "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "quz", "ro", "ru", "sv", "sw", "te", "th",
                    "tr", "uk", "vi", "zh")


def _present(images: Sequence[Path], captions: Sequence[str], where: str) -> tuple[list[Path], list[str]]:
    """The (image, caption) pairs whose image file exists; the others are counted in a warning."""
    keep = [i for i, image in enumerate(images) if image.is_file()]
    if len(keep) < len(images):
        missing = next(image for image in images if not image.is_file())
        log.warning("%s: %d of %d images are missing and left out, e.g. %s", where, len(images) - len(keep),
                    len(images), missing)
    if not keep:
        raise DataError(f"{where}: none of its {len(images)} images exist, e.g. {images[0] if images else '-'}")
    return [images[i] for i in keep], [captions[i] for i in keep]


def dataset_root(root: Path, folder: str) -> Path:
    """CLIP_benchmark's dataset root (holding the annotation files and the data folder `folder`) from `root`, which
    may be that root or the data folder itself (as the benchmark's own sub-folder of a collection is found)."""
    return root.parent if root.name == folder and not (root / folder).is_dir() else root


def _one_each(images: list[Path], captions: list[str], transform: Callable | None, format: str, root: Path,
              where: str) -> CaptionSet:
    images, captions = _present(images, captions, where)
    return caption_set(images, [[c] for c in captions], transform, format, root, where)


class AnnotationsLayout(Layout):
    """CLIP_benchmark's per-language annotation file of a multilingual retrieval set, with the images it names."""

    name = "annotations"

    def __init__(self, prefix: str, folder: str, codes: dict[str, str] | None = None):
        self.prefix, self.folder, self.codes = prefix, folder, codes or {}

    def _file(self, bench: Benchmark, root: Path) -> Path:
        return dataset_root(root, self.folder) / f"{self.prefix}-{self.codes.get(bench.language, bench.language)}.json"

    def expected(self, bench: Benchmark, split: str) -> str:
        return f"{self._file(bench, Path()).name} (CLIP_benchmark's annotations) and its images"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return self._file(bench, root).is_file()

    def _image(self, root: Path, stored: str) -> Path:
        """A stored image path as CLIP_benchmark wrote it (relative to where it ran), else the file of that name in
        the set's image folder under `root` (the folder was moved, or written on another machine)."""
        path = Path(stored)
        if path.is_file():
            return path
        return dataset_root(root, self.folder) / self.folder / "images" / path.name

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        path = self._file(bench, root)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            paths, captions = doc["image_paths"], doc["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not CLIP_benchmark's annotation file (needs \"image_paths\" and \"annotations\"; "
                            f"{type(e).__name__}: {e})") from None
        if not isinstance(paths, list) or not isinstance(captions, list) or len(paths) != len(captions):
            raise DataError(f"{path}: \"image_paths\" and \"annotations\" must be lists of equal length")
        if not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: \"annotations\" must hold one caption (a string) per image")
        return _one_each([self._image(root, str(p)) for p in paths], captions, transform, self.name, path.parent,
                         str(path))


class Crossmodal3600Layout(Layout):
    """Crossmodal-3600 as published: captions.jsonl with every language's captions, and the images by key."""

    name = "xm3600"

    @staticmethod
    def _base(root: Path) -> Path:
        return dataset_root(root, "xm3600") / "xm3600"

    def expected(self, bench: Benchmark, split: str) -> str:
        return "xm3600/captions.jsonl and xm3600/images/<image/key>.jpg"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return (self._base(root) / "captions.jsonl").is_file()

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        path = self._base(root) / "captions.jsonl"
        images, captions = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, caption = item["image/key"], item[bench.language]["caption"][0]
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise DataError(f"{path}:{n}: expected \"image/key\" and a {bench.language!r} caption "
                                f"({type(e).__name__}: {e})") from None
            images.append(path.parent / "images" / f"{key}.jpg")
            captions.append(caption)
        if not images:
            raise DataError(f"{path}: no images")
        return _one_each(images, captions, transform, self.name, path.parent.parent, str(path))


class XtdLayout(Layout):
    """XTD10's published files: an image list and, per language, one caption a line in the same order."""

    name = "xtd"
    INDEX = "test_image_names.txt"

    def __init__(self, folder: str):
        self.folder = folder

    def _find(self, root: Path, name: str, repo_folder: str) -> Path | None:
        root = dataset_root(root, self.folder)
        for base in (root / self.folder, root):
            for sub in ("", repo_folder):
                if (base / sub / name).is_file():
                    return base / sub / name
        return None

    def _files(self, bench: Benchmark, root: Path) -> tuple[Path | None, Path | None]:
        code = XTD_CODES.get(bench.language, bench.language)
        return (self._find(root, self.INDEX, "XTD10"),
                self._find(root, f"test_1kcaptions_{code}.txt", XTD_REPO_FOLDERS.get(code, "XTD10")))

    def expected(self, bench: Benchmark, split: str) -> str:
        code = XTD_CODES.get(bench.language, bench.language)
        return f"{self.folder}/{self.INDEX}, {self.folder}/test_1kcaptions_{code}.txt and {self.folder}/images/"

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        return all(p is not None for p in self._files(bench, root))

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> CaptionSet:
        index, captions = self._files(bench, root)
        assert index is not None and captions is not None, "open() is only called after detect()"
        names = index.read_text(encoding="utf-8").splitlines()
        lines = captions.read_text(encoding="utf-8").splitlines()
        if len(lines) != len(names):  # CLIP_benchmark pairs them with zip, which would hide the shorter one
            log.warning("%s: %d captions for the %d images of %s; the first %d pairs are used", captions, len(lines),
                        len(names), index, min(len(lines), len(names)))
        pairs = list(zip(names, lines))
        base = dataset_root(root, self.folder)
        images = [base / self.folder / "images" / name for name, _ in pairs]
        return _one_each(images, [c for _, c in pairs], transform, self.name, base, str(captions))
