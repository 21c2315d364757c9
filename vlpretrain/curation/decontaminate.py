"""Decontamination: training samples whose images are near duplicates of a benchmark's test images (CLIP paper,
section 5), and the converse, test images that have a near duplicate in the training data.

Test images come from the benchmark registry through the `vlpretrain.benchmark_images` entry-point group (zeroshot
provides `zeroshot.datasets:test_images`: benchmark name and data root -> a sequence of PIL images), so this package
never imports zeroshot.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from vlpretrain.curation.embed import CACHE_FORMAT, Scorer, cache_tag, embed_images
from vlpretrain.errors import ConfigError, VLPretrainError

ENTRY_POINT_GROUP = "vlpretrain.benchmark_images"


def benchmark_images(name: str, root: str | os.PathLike) -> Sequence[Image.Image]:
    """The test images of benchmark `name` under `root`, from the first installed provider that knows it."""
    providers = list(entry_points(group=ENTRY_POINT_GROUP))
    if not providers:
        raise ConfigError(f"--decontaminate {name}: no benchmark registry is installed (entry point group "
                          f"{ENTRY_POINT_GROUP}; zeroshot provides one)")
    error: VLPretrainError | None = None
    for ep in providers:
        try:
            return ep.load()(name, root)
        except VLPretrainError as e:
            error = e
    assert error is not None
    raise error


@dataclass
class TestSet:
    """A benchmark's test images as vectors (thumbnails, and image embeddings when a model is given)."""

    name: str
    thumbs: np.ndarray
    image: np.ndarray | None

    def vectors(self, space: str) -> np.ndarray:
        """The vectors near duplicates are searched in: "pixels" (thumbnails) or "model" (image embeddings)."""
        if space == "model":
            if self.image is None:
                raise ConfigError("near-duplicate space 'model' needs --model")
            return self.image
        return self.thumbs


def test_set(name: str, root: str | os.PathLike, scorer: Scorer | None, cache_dir: str | os.PathLike | None,
             batch_size: int = 256) -> TestSet:
    """The vectors of a benchmark's test images, cached beside the dataset's embeddings."""
    key = hashlib.sha256(f"{CACHE_FORMAT}|{name}|{Path(root).resolve()}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / cache_tag(scorer) / f"benchmark-{name}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            t = load_file(str(path))
            return TestSet(name, t["thumbs"], t.get("image"))
        except Exception:  # a damaged cache file is rebuilt
            pass
    thumbs, image = embed_images(benchmark_images(name, root), scorer, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"thumbs": thumbs, **({"image": image} if image is not None else {})}, str(tmp))
        os.replace(tmp, path)
    return TestSet(name, thumbs, image)


def nearest(queries: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unit query vector, (its highest cosine with a base vector, that base row); -inf and -1 if none."""
    import faiss

    if len(base) == 0 or len(queries) == 0:
        return np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return sims[:, 0], rows[:, 0]


def contaminated(train: np.ndarray, test: np.ndarray, threshold: float,
                 candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bool [n]: training rows with a test image at cosine >= threshold, best cosine [n], that test index [n])."""
    if not -1 <= threshold <= 1:
        raise ConfigError(f"decontamination threshold: a cosine in [-1, 1], got {threshold}")
    sims, rows = nearest(train, test)
    flag = sims >= threshold
    if candidates is not None:
        flag &= candidates
    return flag, sims, rows


def overlapping(test: np.ndarray, train: np.ndarray, threshold: float) -> np.ndarray:
    """bool [m]: test images that have a near duplicate (cosine >= threshold) among the training vectors."""
    if not -1 <= threshold <= 1:
        raise ConfigError(f"overlap threshold: a cosine in [-1, 1], got {threshold}")
    sims, _ = nearest(test, train)
    return sims >= threshold
