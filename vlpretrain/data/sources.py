"""Readers of the source formats the shard writer accepts, registered by name.

Each reader turns a path into a `Source`: an ordered stream of `Record`s (one future sample: image, captions, optional
label) and `Skip`s (a source row that cannot become a sample, with its reason). The order is fixed by the files alone,
so that the writer's shards are reproducible. Readers that can make a record from an index row (a file path, a table
row) hand out a `Rows` sequence, so that the writer shuffles row indices and makes each record only when it writes it.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import IMAGE_SUFFIXES, read_idx


@dataclass(frozen=True)
class Record:
    """One future sample: an image (path to read, encoded bytes, or a raw uint8 array) and its captions."""

    source_id: str
    image: str | bytes | np.ndarray
    captions: tuple[str, ...]
    where: str
    label: int | None = None
    classname: str | None = None


@dataclass(frozen=True)
class Skip:
    """A source row that does not become a sample, and why."""

    where: str
    reason: str
    detail: str = ""


@dataclass
class Source:
    """An ordered stream of records and skips, with its length when the reader knows it.

    `items` is a Sequence when the reader can give any item by index (the writer then shuffles indices only).
    """

    items: Iterable[Record | Skip]
    total: int | None = None


class Rows(Sequence):
    """A reader's index rows (file paths, table rows) made into records only when one is accessed."""

    def __init__(self, rows: Sequence[Any], make: Callable[[Any], Record | Skip]):
        self.rows, self.make = rows, make

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Record | Skip: ...

    @overload
    def __getitem__(self, i: slice) -> list[Record | Skip]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.make(r) for r in self.rows[i]]
        return self.make(self.rows[i])


@dataclass
class SourceOptions:
    """Everything a reader may need besides the path (see `write_shards` for their meaning)."""

    image_column: str = "image"
    caption_column: str = "caption"
    image_root: str | None = None
    one_sample_per_caption: bool = False
    templates: list[str] = field(default_factory=list)
    classes: list[str] | None = None
    split: str = "train"
    seed: int = 0


@dataclass(frozen=True)
class SourceFormat:
    """A registered reader: `detect(path)` says whether the path obviously has this format."""

    name: str
    read: Callable[[Path, SourceOptions], Source]
    detect: Callable[[Path], bool]


FORMATS: dict[str, SourceFormat] = {}


def register_format(name: str, detect: Callable[[Path], bool]):
    """Register a reader under `name`; detection tries formats in registration order."""

    def wrap(fn: Callable[[Path, SourceOptions], Source]):
        FORMATS[name] = SourceFormat(name, fn, detect)
        return fn

    return wrap


def detect_format(path: str | Path) -> str:
    """The name of the one format `path` obviously has, or a ConfigError asking for --format."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: source does not exist")
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    raise ConfigError(f"{path}: cannot tell the source format; pass --format ({', '.join(FORMATS)})")


def read_source(path: str | Path, format: str | None, opts: SourceOptions) -> tuple[str, Source]:
    """Open `path` with the named (or detected) format; returns the format name and its stream."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: source does not exist")
    name = format or detect_format(p)
    if name not in FORMATS:
        raise ConfigError(f"--format {name}: unknown source format (known: {', '.join(FORMATS)})")
    return name, FORMATS[name].read(p, opts)


def load_templates(path: str | Path) -> list[str]:
    """Caption templates, one per line with `{c}` for the class name; blank lines and `#` comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: templates file does not exist")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{c}" not in line:
            raise DataError(f"{path}:{i}: template has no {{c}} placeholder: {line!r}")
        out.append(line)
    if not out:
        raise DataError(f"{path}: no templates in file")
    return out


def load_classes(path: str | Path) -> list[str]:
    """Class names, one per line, in label order; blank lines and `#` comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: class names file does not exist")
    lines = (line.strip() for line in p.read_text(encoding="utf-8").splitlines())
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise DataError(f"{path}: no class names in file")
    return names


# ---------------------------------------------------------------------------------------------------------------
# tables: csv, tsv, jsonl (img2dataset's url/caption columns included)


def _resolve_image(value: str, root: Path) -> str:
    p = Path(value.removeprefix("file://"))
    return str(p if p.is_absolute() else root / p)


def _table_rows(path: Path, delimiter: str | None) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a csv/tsv (delimiter given) or jsonl (delimiter None) file, UTF-8 with or without a
    byte-order mark; other encodings are named as the problem, with the line where decoding failed."""
    # utf-8-sig reads a BOM-prefixed file (Excel's "CSV UTF-8") as well as plain UTF-8
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            if delimiter is None:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{i}: expected a JSON object per line")
                    yield f"{path.name}:{i}", row
            else:
                reader = csv.DictReader(f, delimiter=delimiter)
                for row in reader:
                    yield f"{path.name}:{reader.line_num}", row
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_first_non_utf8_line(path)}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                            "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None


def _first_non_utf8_line(path: Path) -> int:
    """The 1-based number of the first line that is not valid UTF-8 (text decoding reads ahead in blocks)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return 0


def _captions_of(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def _read_table(path: Path, opts: SourceOptions, delimiter: str | None) -> Source:
    """Rows grouped by image in order of first appearance (or one sample per row)."""
    root = Path(opts.image_root) if opts.image_root else path.parent
    rows = list(_table_rows(path, delimiter))
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = set(rows[0][1])
    image_col = opts.image_column
    if image_col not in columns and image_col == "image" and "url" in columns:
        image_col = "url"  # img2dataset's input column name
    for col in (image_col, opts.caption_column):
        if col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(sorted(columns))})")
    groups: dict[str, tuple[str, list[str], list[str]]] = {}
    skips: list[Skip] = []
    for where, row in rows:
        image = str(row.get(image_col) or "")
        if not image:
            skips.append(Skip(where, "missing file", f"empty {image_col!r} column"))
            continue
        caps = [c.strip() for c in _captions_of(row.get(opts.caption_column)) if c and c.strip()]
        if not caps:
            skips.append(Skip(where, "empty caption"))
            continue
        _, group_wheres, group_caps = groups.setdefault(where if opts.one_sample_per_caption else image,
                                                        (image, [], []))
        group_wheres.append(where)
        group_caps.extend(caps)
    items: list[Record | Skip] = list(skips)
    for image, wheres, caps in groups.values():
        where = ",".join(wheres) if len(wheres) <= 3 else f"{wheres[0]} (+{len(wheres) - 1} rows)"
        items.append(Record(image, _resolve_image(image, root), tuple(caps), where))
    return Source(items, len(items))


def _has_suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda p: p.is_file() and p.suffix.lower() in suffixes


def _looks_like_csv_txt(p: Path) -> bool:
    """A .txt captions table such as Flickr8k's captions.txt (`image,caption` header)."""
    if not (p.is_file() and p.suffix.lower() == ".txt"):
        return False
    with open(p, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return "\t" not in first and {"image", "caption"} <= {c.strip().strip('"') for c in first.split(",")}


@register_format("csv", lambda p: _has_suffix(".csv")(p) or _looks_like_csv_txt(p))
def read_csv(path: Path, opts: SourceOptions) -> Source:
    """Comma-separated table with a header row."""
    return _read_table(path, opts, ",")


@register_format("tsv", _has_suffix(".tsv"))
def read_tsv(path: Path, opts: SourceOptions) -> Source:
    """Tab-separated table with a header row."""
    return _read_table(path, opts, "\t")


@register_format("jsonl", _has_suffix(".jsonl"))
def read_jsonl(path: Path, opts: SourceOptions) -> Source:
    """One JSON object per line; the caption column may hold a string or a list of strings."""
    return _read_table(path, opts, None)


# ---------------------------------------------------------------------------------------------------------------
# coco captions


def _coco_image_root(path: Path, opts: SourceOptions) -> Path:
    """annotations/captions_train2017.json has its images in ../train2017 unless --image-root says otherwise."""
    if opts.image_root:
        return Path(opts.image_root)
    m = re.match(r"captions_(.+)\.json$", path.name)
    if m and (path.parent.parent / m.group(1)).is_dir():
        return path.parent.parent / m.group(1)
    return path.parent


@register_format("coco", lambda p: p.is_file() and re.match(r"captions_.*\.json$", p.name) is not None)
def read_coco(path: Path, opts: SourceOptions) -> Source:
    """A COCO captions json (`images` + `annotations`) and its image folder; images in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, anns = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    root = _coco_image_root(path, opts)
    captions: dict[int, list[str]] = {}
    for a in anns:
        caption = str(a.get("caption") or "").strip()
        if caption:
            captions.setdefault(a["image_id"], []).append(caption)
    items: list[Record | Skip] = []
    for im in images:
        where = f"{path.name}: image id {im['id']}"
        caps = captions.get(im["id"], [])
        file = str(root / im["file_name"])
        if not caps:
            items.append(Skip(where, "empty caption", "no non-empty caption annotation"))
        elif opts.one_sample_per_caption:
            items += [Record(im["file_name"], file, (c,), f"{where} caption {i}") for i, c in enumerate(caps)]
        else:
            items.append(Record(im["file_name"], file, tuple(caps), where))
    return Source(items, len(items))


# ---------------------------------------------------------------------------------------------------------------
# folder of images with sidecar captions


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _is_caption_folder(p: Path) -> bool:
    if not p.is_dir():
        return False
    first = next((f for f in _image_files(p)), None)
    return first is not None and first.with_suffix(".txt").is_file()


@register_format("folder", _is_caption_folder)
def read_folder(path: Path, opts: SourceOptions) -> Source:
    """Images anywhere under `path`, each captioned by the .txt file of the same stem beside it."""
    files = _image_files(path)

    def record(f: Path) -> Record | Skip:
        rel = str(f.relative_to(path))
        txt = f.with_suffix(".txt")
        if not txt.is_file():
            return Skip(rel, "missing caption", f"no {txt.name}")
        return Record(rel, str(f), (txt.read_text(encoding="utf-8", errors="replace").strip(),), rel)

    return Source(Rows(files, record), len(files))


# ---------------------------------------------------------------------------------------------------------------
# labelled classification sets + caption templates


@dataclass(frozen=True)
class _Labelled:
    """A classification set: per sample (source id, image, label), plus the class names."""

    samples: Callable[[], Iterator[tuple[str, str | np.ndarray, int]]]
    classes: list[str]
    total: int


LABELLED_LAYOUTS: dict[str, tuple[Callable[[Path, str], bool], Callable[[Path, SourceOptions], _Labelled]]] = {}


def _layout(name: str, detect: Callable[[Path, str], bool]):
    def wrap(fn):
        LABELLED_LAYOUTS[name] = (detect, fn)
        return fn

    return wrap


def _idx_dir(root: Path) -> Path | None:
    """The folder holding the idx files: the root itself or torchvision's <root>/<Name>/raw/."""
    for d in [root, *sorted(root.glob("*/raw"))]:
        if any(d.glob("train-images-idx3-ubyte*")) or any(d.glob("t10k-images-idx3-ubyte*")):
            return d
    return None


def _idx_file(d: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).is_file():
            return d / name
    raise DataError(f"{d}: missing {stem}[.gz]")


@_layout("idx", lambda root, split: root.is_dir() and _idx_dir(root) is not None)
def _labelled_idx(root: Path, opts: SourceOptions) -> _Labelled:
    """MNIST / Fashion-MNIST idx files; `split` picks train or t10k; class names from `classes`, else numbers."""
    d = _idx_dir(root)
    assert d is not None
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(opts.split)
    if prefix is None:
        raise ConfigError(f"--split {opts.split}: idx sets have 'train' and 'test'")
    images = read_idx(_idx_file(d, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(d, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise DataError(f"{d}: {len(images)} images but {len(labels)} labels")
    # idx files hold label numbers only: without class names (--classes) a label is named by its number
    classes = opts.classes or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    name = _idx_file(d, f"{prefix}-images-idx3-ubyte").name

    def samples():
        for i in range(len(images)):
            yield f"{name}#{i}", images[i], int(labels[i])

    return _Labelled(samples, list(classes), len(images))


def _is_image_folder(root: Path, split: str) -> bool:
    subdirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    return bool(subdirs) and all(any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()) for d in subdirs)


@_layout("imagefolder", _is_image_folder)
def _labelled_imagefolder(root: Path, opts: SourceOptions) -> _Labelled:
    """torchvision's ImageFolder: one sub-folder per class, labels in sorted folder order."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    files = [(f, label) for label, d in enumerate(dirs) for f in _image_files(d)]
    classes = opts.classes or [d.name.replace("_", " ") for d in dirs]

    def samples():
        for f, label in files:
            yield str(f.relative_to(root)), str(f), label

    return _Labelled(samples, list(classes), len(files))


def _is_labelled(p: Path) -> bool:
    return p.is_dir() and not _is_caption_folder(p) and any(det(p, "train") for det, _ in LABELLED_LAYOUTS.values())


def fill_template(template: str, classname: str) -> str:
    """Put the class name in for `{c}`; "a {c}" becomes "an {c}" before a vowel ("an ankle boot")."""
    if classname[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{c\}", r"\1n {c}", template)
    return template.replace("{c}", classname)


def _template_caption(templates: list[str], seed: int, source_id: str, classname: str) -> str:
    """One template per sample, chosen by (seed, source id) so that it never depends on order or workers."""
    rng = random.Random(f"{seed}/{source_id}")
    return fill_template(rng.choice(templates), classname)


@register_format("labelled", _is_labelled)
def read_labelled(path: Path, opts: SourceOptions) -> Source:
    """A classification set on disk, captioned from templates; the label goes in each sample's .json."""
    if not opts.templates:
        raise ConfigError(f"{path}: the labelled format needs caption templates (--templates FILE)")
    layout = next((name for name, (det, _) in LABELLED_LAYOUTS.items() if det(path, opts.split)), None)
    if layout is None:
        raise DataError(f"{path}: not a labelled set ({' or '.join(LABELLED_LAYOUTS)} layout)")
    data = LABELLED_LAYOUTS[layout][1](path, opts)

    def record(row: tuple[str, str | np.ndarray, int]) -> Record | Skip:
        sid, image, label = row
        if not 0 <= label < len(data.classes):
            return Skip(sid, "missing caption", f"label {label} has no class name")
        name = data.classes[label]
        return Record(sid, image, (_template_caption(opts.templates, opts.seed, sid, name),), sid, label, name)

    # the rows hold paths or views into the already loaded arrays, never decoded images
    return Source(Rows(list(data.samples()), record), data.total)
