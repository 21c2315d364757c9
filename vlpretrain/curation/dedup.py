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


def near_duplicates(vectors: np.ndarray, candidates: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """(bool [n]: candidates to drop, number of groups of two or more). Candidates whose unit vectors have a cosine
    of at least `threshold` are linked, groups are the linked components, and each keeps its first row."""
    if not -1 <= threshold <= 1:
        raise ConfigError(f"near-duplicate threshold: a cosine in [-1, 1], got {threshold}")
    import faiss

    rows = np.flatnonzero(candidates)
    drop = np.zeros(len(vectors), dtype=bool)
    if len(rows) < 2:
        return drop, 0
    x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
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
