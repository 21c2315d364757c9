"""Duplicates: exact (the same decoded pixels) and near (embeddings closer than a cosine threshold, found with
faiss), keeping one sample per group, the first in dataset order."""

from __future__ import annotations

import numpy as np

from vlpretrain.errors import ConfigError


def exact_duplicates(hashes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """bool [n]: rows among `candidates` whose pixel hash an earlier candidate already has."""
    seen: set[bytes] = set()
    drop = np.zeros(len(hashes), dtype=bool)
    for i in np.flatnonzero(candidates):
        h = hashes[i].tobytes()
        if h in seen:
            drop[i] = True
        else:
            seen.add(h)
    return drop


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


APPROXIMATE_ABOVE = 10000  # candidates above which near duplicates are searched with an IVF index (at 10k: 1.5x faster)
IVF_PROBES = 16


def similarity_index(x: np.ndarray, approximate: bool):
    """A faiss inner-product index holding the rows of `x`: brute force, or IVF (sqrt(n) k-means cells, the query's
    16 nearest cells searched). Near duplicates sit close to each other, so their cells are among the nearest: on
    the 60k Fashion-MNIST thumbnails it found every pair brute force finds at 0.99, 5x faster
    (benchmarks/curation.py)."""
    import faiss

    dim = x.shape[1]
    if not approximate:
        index = faiss.IndexFlatIP(dim)
    else:
        cells = max(1, int(round(np.sqrt(len(x)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0  # the same cells, so the same groups, on every run
        index.train(x)
        index.nprobe = min(IVF_PROBES, cells)
    index.add(x)
    return index


def near_duplicates(vectors: np.ndarray, candidates: np.ndarray, threshold: float,
                    approximate_above: int = APPROXIMATE_ABOVE) -> tuple[np.ndarray, int]:
    """(bool [n]: candidates to drop, number of groups of two or more). Candidates whose unit vectors have a cosine
    of at least `threshold` are linked, groups are the linked components, and each keeps its first row. More than
    `approximate_above` candidates are searched with an approximate index (`similarity_index`)."""
    if not -1 <= threshold <= 1:
        raise ConfigError(f"near-duplicate threshold: a cosine in [-1, 1], got {threshold}")
    rows = np.flatnonzero(candidates)
    drop = np.zeros(len(vectors), dtype=bool)
    if len(rows) < 2:
        return drop, 0
    x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    index = similarity_index(x, approximate=len(rows) > approximate_above)
    # faiss keeps results strictly above the radius; a tiny step down makes the threshold inclusive
    lims, _, found = index.range_search(x, float(np.nextafter(np.float32(threshold), np.float32(-2))))
    parent = np.arange(len(rows))
    for q in range(len(rows)):
        for j in found[lims[q]:lims[q + 1]]:
            a, b = _find(parent, q), _find(parent, int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is the group's first row
    roots = np.array([_find(parent, i) for i in range(len(rows))])
    drop[rows] = roots != np.arange(len(rows))
    sizes = np.bincount(roots, minlength=len(rows))
    return drop, int((sizes >= 2).sum())
