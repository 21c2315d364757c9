"""Your own class names and templates for zero-shot heads (`--classnames FILE`, `--templates FILE`), checked
against the benchmarks before any data is read.

A file is either JSON keyed by benchmark name (ours or CLIP_benchmark's alias, as its --custom_classname_file and
--custom_template_file take them):

    {"cifar10": ["airplane", "automobile", ...]}                      class names, in label order
    {"cifar10": ["a photo of a {c}.", "a blurry photo of a {c}."]}   templates: {c} becomes the class name
    {"imagenet1k": {"tench": ["A tench is a freshwater fish ...", ...], ...}}   class-specific prompts (CuPL)

or plain text, one class name or template a line, for a single benchmark. `--templates cupl` names the CuPL prompts
CLIP_benchmark ships (zeroshot/assets/prompts/cupl.json.gz, ImageNet-1k). As in CLIP_benchmark, a benchmark the
templates file has no key for takes the file's imagenet1k entry when it has one (class-specific prompts only where
they name every class of the benchmark: ImageNet's variants), else keeps its own.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpretrain.errors import ConfigError, DataError
from zeroshot.datasets import CLASSIFICATION_TASKS, Benchmark, EvalSet, get_benchmark
from zeroshot.datasets.base import ASSETS

BUILTIN = {"cupl": ASSETS / "prompts" / "cupl.json.gz"}
FALLBACK = "imagenet1k"  # CLIP_benchmark's default entry of a templates file
Prompts = list[str] | dict[str, list[str]]
Source = str | os.PathLike | Sequence[str] | Mapping[str, Any] | None


@dataclass(frozen=True)
class CustomPrompts:
    """Class names and templates that replace a benchmark's own, by benchmark name (made by `read_prompts`)."""

    classnames: dict[str, list[str]] = field(default_factory=dict)
    templates: dict[str, Prompts] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # benchmark -> where its replacements come from

    def apply(self, bench: Benchmark, data: EvalSet) -> EvalSet:
        """`data` with this benchmark's replacements; the class count on disk must match the class names given."""
        names = self.classnames.get(bench.name)
        if names is not None and len(names) != len(data.classnames):
            raise DataError(f"{data.root}: {bench.name} has {len(data.classnames)} classes there, "
                            f"{len(names)} class names given ({self.origin[bench.name]})")
        classnames = names if names is not None else data.classnames
        templates = self.templates.get(bench.name, data.templates)
        if isinstance(templates, dict):
            missing = [c for c in _names(classnames) if c not in templates]
            if missing:
                raise DataError(f"{data.root}: no class-specific prompts for {bench.name}'s class {missing[0]!r} "
                                f"({self.origin[bench.name]})")
        return dataclasses.replace(data, classnames=list(classnames), templates=templates)


def _names(classnames: Sequence) -> list[str]:
    """Every name of every class (a class may be a list of synonyms)."""
    return [n for c in classnames for n in ([c] if isinstance(c, str) else c)]


def _read(source: Source, what: str) -> tuple[Any, str]:
    """(parsed content, where it came from) of a file, a built-in name or a Python value."""
    if source is None or not isinstance(source, (str, os.PathLike)):
        return source, f"{what} given"
    path = BUILTIN.get(str(source)) if what == "templates" else None
    path = path or Path(source)
    where = f"--{what} {source}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: unreadable ({e})") from None
    if path.suffix in (".json", ".gz") or text.lstrip().startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if path in BUILTIN.values():
            doc = doc["templates"]  # our asset wraps the published mapping with its sources
        return doc, where
    return [line.strip() for line in text.splitlines() if line.strip()], where


def _per_benchmark(doc: Any, where: str, benches: list[Benchmark], what: str,
                   names: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """The entry of each evaluated benchmark: a keyed document's own (or its imagenet1k fallback, for templates:
    class-specific prompts only for a benchmark whose class names, `names` or its own, they all cover), a plain
    list's for the one classification benchmark evaluated."""
    if doc is None:
        return {}
    if isinstance(doc, Mapping):
        keyed = {}
        for key, value in doc.items():
            try:
                keyed[get_benchmark(str(key)).name] = value
            except ConfigError:
                raise ConfigError(f"{where}: unknown benchmark {key!r} (see `zeroshot list`)") from None
        out = {b.name: keyed[b.name] for b in benches if b.name in keyed}
        if what == "templates" and FALLBACK in keyed:
            fallback = keyed[FALLBACK]
            for b in benches:
                own = (names or {}).get(b.name, b.classnames)
                if b.name not in out and b.task in CLASSIFICATION_TASKS and (
                        not isinstance(fallback, Mapping) or all(n in fallback for n in _names(own))):
                    out[b.name] = fallback
        if not out:
            raise ConfigError(f"{where}: has no entry for {', '.join(b.name for b in benches)} "
                              f"(its keys: {', '.join(list(keyed)[:5])}{', ...' if len(keyed) > 5 else ''})")
        return out
    if isinstance(doc, Sequence) and not isinstance(doc, str):
        classifying = [b for b in benches if b.task in CLASSIFICATION_TASKS] or benches  # the others take none
        if len(classifying) != 1:
            raise ConfigError(f"{where}: a plain list is for one benchmark, not {len(classifying)} "
                              "(give JSON keyed by benchmark name)")
        return {classifying[0].name: doc}
    raise ConfigError(f"{where}: expected a JSON object keyed by benchmark, or a list")


def _check_classnames(value: Any, bench: Benchmark, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise ConfigError(f"{where}: {bench.name}'s class names must be a non-empty list of names")
    if len(value) != len(bench.classnames):
        raise ConfigError(f"{where}: {len(value)} class names for {bench.name}, which has {len(bench.classnames)} "
                          "classes")
    return [c.strip() for c in value]


def _check_templates(value: Any, bench: Benchmark, classnames: Sequence, where: str) -> Prompts:
    if isinstance(value, Mapping):
        for name in _names(classnames):
            prompts = value.get(name)
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ConfigError(f"{where}: no class-specific prompts for {bench.name}'s class {name!r}")
        return {str(k): list(v) for k, v in value.items()}
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"{where}: {bench.name}'s templates must be a non-empty list of strings, or class-specific "
                          "prompts keyed by class name")
    bad = next((t for t in value if "{c}" not in t), None)
    if bad is not None:
        raise ConfigError(f"{where}: template {bad!r} for {bench.name} has no {{c}} for the class name")
    return list(value)


def read_prompts(benchmarks: Sequence[str], classnames: Source = None, templates: Source = None) -> CustomPrompts:
    """Class names and templates for `benchmarks` from files (a path; for templates also "cupl"), or from Python
    values of the same shapes; every error is a ConfigError naming the file and what is wrong with it."""
    benches = [get_benchmark(n) for n in benchmarks]
    out = CustomPrompts()
    doc, where_names = _read(classnames, "classnames")
    for name, value in _per_benchmark(doc, where_names, benches, "classnames").items():
        bench = get_benchmark(name)
        _check_task(bench, where_names)
        out.classnames[name] = _check_classnames(value, bench, where_names)
        out.origin[name] = f"class names from {where_names}"
    doc, where_templates = _read(templates, "templates")
    for name, value in _per_benchmark(doc, where_templates, benches, "templates", out.classnames).items():
        bench = get_benchmark(name)
        _check_task(bench, where_templates)
        own = out.classnames.get(name, bench.classnames)
        out.templates[name] = _check_templates(value, bench, own, where_templates)
        origin = f"templates from {where_templates}"
        out.origin[name] = f"{out.origin[name]}, {origin}" if name in out.origin else origin
    return out


def _check_task(bench: Benchmark, where: str) -> None:
    if bench.task not in CLASSIFICATION_TASKS:
        raise ConfigError(f"{where}: {bench.name} is a {bench.task} benchmark; it has no class names or templates")


def benchmark_prompts(bench: Benchmark, classnames: Source = None, templates: Source = None,
                      shared: bool = False) -> tuple[list[str], Prompts]:
    """The class names and templates `bench` is classified with: the files' (see read_prompts), else its own;
    `shared` refuses class-specific prompts, for heads that learn one context per template (zeroshot adapt)."""
    custom = read_prompts([bench.name], classnames, templates)
    names = custom.classnames.get(bench.name, bench.classnames)
    temps = custom.templates.get(bench.name, bench.templates)
    if shared and isinstance(temps, dict):
        raise ConfigError(f"templates: {bench.name}'s class-specific prompts have no templates shared by every "
                          "class, which adapt learns from; give templates with {c}")
    return names, temps
