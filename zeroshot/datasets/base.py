"""The benchmark registry: what a benchmark is, the on-disk layouts it can be read from, and lookup by name.

A benchmark has a task (classification, multilabel classification or image-text retrieval), a headline metric and
the layouts it can be read from; a classification benchmark also has data (class names, templates, folder names in
`zeroshot/assets/<name>.json`). Every benchmark can also be read from the generic layouts of its task (CLIP_benchmark's
webdataset export; for retrieval also our own shards and a COCO captions file), which are added to its own layouts
here, so a new entry only names the layouts that are particular to it. The modules defining layouts import this one
and add their generic layouts with `add_generic_layouts`; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlpretrain.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LANGUAGE_ASSETS = ASSETS / "languages"  # languages/<language>/<benchmark>.json: the same schema, other languages
DEFAULT_LANGUAGE = "en"  # English prompts are zeroshot/assets/<benchmark>.json itself
# Languages are ISO 639-1 codes; CLIP_benchmark's own codes for two of them are accepted as well.
LANGUAGE_ALIASES = {"jp": "ja", "cn": "zh"}
SPLITS = ("test", "train")
TASKS = ("classification", "multilabel", "retrieval")
CLASSIFICATION_TASKS = ("classification", "multilabel")
METRICS = {"classification": ("top1", "mean_per_class_recall"), "multilabel": ("mean_average_precision",),
           "retrieval": ("mean_recall",)}


@dataclass
class EvalSet:
    """A benchmark split opened from disk: (image, label) pairs plus the prompts to classify them with."""

    dataset: Dataset
    classnames: list[str]
    templates: list[str]
    format: str
    root: Path
    targets: torch.Tensor | None = None  # multi-label: 0/1 [N, classes]; the dataset's labels are then 0..N-1

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


@dataclass
class CaptionSet:
    """A retrieval split opened from disk: each image once, yielding (image, its index), and every caption with the
    index of its image (an image with five captions is one image and five texts)."""

    images: Dataset
    captions: list[str]
    text_to_image: list[int]
    format: str
    root: Path

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]


class Layout:
    """One way a benchmark can sit on disk (torchvision's files, class folders, webdataset shards)."""

    name: str = ""

    def expected(self, bench: Benchmark, split: str) -> str:
        """One line naming the files this layout needs, relative to the benchmark root."""
        raise NotImplementedError

    def detect(self, bench: Benchmark, root: Path, split: str) -> bool:
        """Whether the files marking this layout are under `root` (the rest is checked by `open`)."""
        raise NotImplementedError

    def open(self, bench: Benchmark, root: Path, split: str, transform: Callable | None) -> EvalSet | CaptionSet:
        """Index the split; raise DataError naming the missing or broken file."""
        raise NotImplementedError

    def evalset(self, bench: Benchmark, root: Path, dataset: Dataset, targets: torch.Tensor | None = None) -> EvalSet:
        return EvalSet(dataset, bench.classnames, bench.templates, self.name, root, targets)


def asset_path(name: str, language: str = DEFAULT_LANGUAGE) -> Path:
    """Where the prompts of benchmark `name` in `language` live: assets/<name>.json for English, else
    assets/languages/<language>/<name>.json."""
    return ASSETS / f"{name}.json" if language == DEFAULT_LANGUAGE else LANGUAGE_ASSETS / language / f"{name}.json"


@functools.cache
def load_asset(name: str, language: str = DEFAULT_LANGUAGE) -> dict[str, Any]:
    """The class names, templates and optional folder names of a benchmark in `language`, from its asset file."""
    path = asset_path(name, language)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["classnames"] and data["templates"], f"{path}: empty class names or templates"
    if language != DEFAULT_LANGUAGE:
        english = load_asset(name)
        assert len(data["classnames"]) == len(english["classnames"]), \
            f"{path}: {len(data['classnames'])} class names, the English file has {len(english['classnames'])}"
    return data


@functools.cache
def asset_languages(name: str) -> tuple[str, ...]:
    """The languages benchmark `name` has prompts in: English first, then the others in alphabetical order."""
    others = sorted(p.name for p in LANGUAGE_ASSETS.iterdir() if (p / f"{name}.json").is_file()) \
        if LANGUAGE_ASSETS.is_dir() else []
    return (DEFAULT_LANGUAGE, *(lang for lang in others if lang != DEFAULT_LANGUAGE))


@dataclass(frozen=True)
class Benchmark:
    """A zero-shot benchmark: task, prompts (from its asset file, for classification), headline metric, layouts."""

    name: str
    layouts: tuple[Layout, ...] = ()
    metric: str = "top1"
    aliases: tuple[str, ...] = ()  # sub-folder names tried under a collection root (CLIP_benchmark's dataset names)
    notes: str = ""
    task: str = "classification"
    clip_benchmark: str = ""  # its dataset name in CLIP_benchmark's result files (default: the first alias or name)
    caption_languages: tuple[str, ...] = ()  # retrieval: the languages its captions come in (default: English)
    language: str = DEFAULT_LANGUAGE  # of the prompts (classification) or captions (retrieval); see in_language

    def __post_init__(self) -> None:
        assert self.task in TASKS, f"{self.name}: unknown task {self.task}"
        assert self.metric in METRICS[self.task], f"{self.name}: metric {self.metric} is not one of {self.task}'s"

    @property
    def languages(self) -> tuple[str, ...]:
        """The languages this benchmark can be evaluated in (class names and templates, or captions)."""
        if self.task == "retrieval":
            others = sorted(lang for lang in self.caption_languages if lang != DEFAULT_LANGUAGE)
            return (DEFAULT_LANGUAGE, *others)
        return asset_languages(self.name)

    def in_language(self, language: str | None) -> Benchmark:
        """This benchmark with its prompts (or captions) in `language`; one line naming the languages it has when
        it lacks that one."""
        language = LANGUAGE_ALIASES.get(language or DEFAULT_LANGUAGE, language or DEFAULT_LANGUAGE)
        if language == self.language:
            return self
        if language not in self.languages:
            what = "captions" if self.task == "retrieval" else "class names and templates"
            raise ConfigError(f"language: {self.name} has no {what} in {language!r}; it has "
                              f"{', '.join(self.languages)}")
        return dataclasses.replace(self, language=language)

    @property
    def _all_layouts(self) -> tuple[Layout, ...]:
        generic = tuple(cls() for cls in GENERIC_LAYOUTS[self.task])
        if self.task == "retrieval":  # a benchmark's own annotation files are the most specific markers
            # the generic caption layouts hold one set of captions with no language: English only
            return (*self.layouts, *(generic if self.language == DEFAULT_LANGUAGE else ()))
        # CLIP_benchmark's layout is tried first: its marker files (classnames.txt beside split folders of
        # shards) are specific, while a class-folder layout would take a shard folder for a class.
        return (*generic, *self.layouts)

    @property
    def classnames(self) -> list[str]:
        return [] if self.task == "retrieval" else list(load_asset(self.name, self.language)["classnames"])

    @property
    def templates(self) -> list[str]:
        return [] if self.task == "retrieval" else list(load_asset(self.name, self.language)["templates"])

    @property
    def folders(self) -> list[str] | None:
        """On-disk folder name of each class, in class order, where the dataset's folders are not sorted names."""
        return None if self.task == "retrieval" else load_asset(self.name).get("folders")

    @property
    def sources(self) -> dict[str, str]:
        if self.task == "retrieval":
            return {"annotations": self.notes}
        return dict(load_asset(self.name, self.language)["sources"])

    @property
    def formats(self) -> tuple[str, ...]:
        own = [layout.name for layout in self.layouts]
        return tuple(dict.fromkeys([*own, *(layout.name for layout in self._all_layouts if layout.name not in own)]))

    @property
    def result_name(self) -> str:
        """The dataset name CLIP_benchmark writes in its result files for this benchmark."""
        return self.clip_benchmark or (self.aliases[0] if self.aliases else self.name)

    def layout_for(self, root: Path, split: str = "test", format: str | None = None) -> Layout:
        """The layout named by `format`, else the first whose marker files are under `root`."""
        candidates = self._all_layouts
        if format is not None:
            candidates = tuple(layout for layout in candidates if layout.name == format)
            if not candidates:
                raise ConfigError(f"format: {self.name} cannot be read as {format!r} (formats: {', '.join(self.formats)})")
        if not root.is_dir():
            raise DataError(f"{root}: {self.name} data root does not exist; expected {self.expected(split, candidates)}")
        for layout in candidates:
            if layout.detect(self, root, split):
                return layout
        raise DataError(f"{root}: no {self.name} {split} data found; expected {self.expected(split, candidates)}")

    def expected(self, split: str = "test", layouts: Sequence[Layout] | None = None) -> str:
        shown = sorted(layouts or self._all_layouts, key=lambda lay: lay not in self.layouts)  # its own first
        return " or ".join(f"[{layout.name}] {layout.expected(self, split)}" for layout in shown)

    def locate(self, root: str | Path, split: str = "test", format: str | None = None) -> tuple[Path, Layout]:
        """The benchmark's folder under `root` and its layout, found from marker files only (cheap)."""
        if split not in SPLITS:
            raise ConfigError(f"split: expected one of {SPLITS}, got {split!r}")
        resolved = resolve_root(self, Path(root))
        try:
            return resolved, self.layout_for(resolved, split, format)
        except DataError as e:
            if resolved == Path(root) and Path(root).is_dir():  # maybe a collection root without our sub-folder
                raise DataError(f"{e} (there, or in a {self.name}/ sub-folder)") from None
            raise

    def load(self, root: str | Path, split: str = "test", transform: Callable | None = None,
             format: str | None = None) -> EvalSet | CaptionSet:
        """Open `split` of this benchmark from `root` (a collection folder or the benchmark's own folder)."""
        resolved, layout = self.locate(root, split, format)
        return layout.open(self, resolved, split, transform)


# task -> the layouts every benchmark of that task can also be read from, in the order tried; filled by the
# layout modules when imported (the package's __init__ imports them all)
GENERIC_LAYOUTS: dict[str, list[type[Layout]]] = {task: [] for task in TASKS}


def add_generic_layouts(tasks: Sequence[str], *layouts: type[Layout]) -> None:
    """Make `layouts` readable for every benchmark of `tasks`, after those added before."""
    for task in tasks:
        GENERIC_LAYOUTS[task].extend(layouts)


BENCHMARKS: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    """Add a benchmark to the registry under its name (names are unique)."""
    assert bench.name not in BENCHMARKS, f"benchmark {bench.name} registered twice"
    if bench.task != "retrieval":
        load_asset(bench.name)  # fail at import time, not mid-evaluation, when an asset file is missing
    BENCHMARKS[bench.name] = bench
    return bench


def get_benchmark(name: str, language: str | None = None) -> Benchmark:
    """The registered benchmark called `name` (its CLIP_benchmark alias works too), with its prompts (or captions)
    in `language` (default English; ConfigError naming the languages it has when it lacks that one)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name].in_language(language)
    for bench in BENCHMARKS.values():
        if name in bench.aliases:
            return bench.in_language(language)
    import difflib

    names = sorted({*BENCHMARKS, *(a for b in BENCHMARKS.values() for a in b.aliases)})
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"benchmark: unknown benchmark {name!r}{hint} (see `zeroshot list`)")


def resolve_root(bench: Benchmark, root: Path) -> Path:
    """`root/<name>` (or an alias sub-folder) when `root` is a collection of benchmarks, else `root` itself.

    CLIP_benchmark's webdataset collection names its folders wds_<name> and wds_vtab-<name>; those work too.
    """
    names = (bench.name, *bench.aliases)
    for sub in (*names, *(f"wds_{n}" for n in names), *(f"wds_vtab-{n}" for n in names)):
        if (root / sub).is_dir():
            return root / sub
    return root


def first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of `root/c` that exists (an empty candidate means `root` itself)."""
    for c in candidates:
        p = root / c if c else root
        if p.exists():
            return p
    return None
