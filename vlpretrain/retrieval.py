"""Image-text retrieval recall as a pure function: ranks of the right answers both ways, from features alone.

Low-level on purpose: the trainer's validation (`vlpretrain.heldout`) and zeroshot's retrieval benchmarks
(`zeroshot.retrieve`) rank their features with it; it imports nothing of either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlpretrain.errors import DataError


def _first_hit_ranks(queries: torch.Tensor, query_group: torch.Tensor, candidates: torch.Tensor,
                     candidate_group: torch.Tensor, positives: list[torch.Tensor], chunk: int,
                     query_chunk: int, device: torch.device) -> torch.Tensor:
    """For each query, 1 + the number of wrong candidates (another group) scoring at least as high as its best right
    candidate (same group), computed block by block so that at most query_chunk x (chunk + positives) scores exist
    at a time. Each block also scores the query's own positives, so the comparison uses numbers from one matmul."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for q0 in range(0, len(queries), query_chunk):
        q = F.normalize(queries[q0:q0 + query_chunk].to(device).float(), dim=-1)
        qg = query_group[q0:q0 + query_chunk].to(device)
        pos = positives[q0:q0 + query_chunk]
        owner = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(pos)]).to(device)
        pos_feats = F.normalize(candidates[torch.cat(pos)].to(device).float(), dim=-1)
        above = torch.zeros(len(q), dtype=torch.long, device=device)
        for c0 in range(0, len(candidates), chunk):
            c = F.normalize(candidates[c0:c0 + chunk].to(device).float(), dim=-1)
            scores = q @ torch.cat([c, pos_feats]).T
            right = scores[owner, len(c) + torch.arange(len(owner), device=device)]
            best = torch.full((len(q),), float("-inf"), device=device).scatter_reduce(0, owner, right, "amax")
            wrong = candidate_group[c0:c0 + chunk].to(device)[None, :] != qg[:, None]
            above += ((scores[:, :len(c)] >= best[:, None]) & wrong).sum(1)
        ranks[q0:q0 + query_chunk] = (above + 1).cpu()
    return ranks


def _rank_metrics(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_recall@{k}": float((ranks <= k).float().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.float().mean())
    out[f"{prefix}_median_rank"] = float(ranks.float().quantile(0.5))
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, *,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 8192, query_chunk: int = 256,
                      device: str | torch.device | None = None) -> dict[str, float]:
    """Recall@k, mean and median rank of both retrieval directions, with CLIP_benchmark's names:

    image_retrieval_*  text -> image: a text's query is a hit at k when its one image ranks in the top k
    text_retrieval_*   image -> text: an image's query is a hit at k when any of its captions ranks in the top k
    mean_recall        the mean of all those recalls (the headline); plus images and texts (the counts)

    Features [images, D] and [texts, D] are L2-normalised here (cosine similarity); `text_to_image[t]` is the index
    of caption t's image. Ranks are 1-based and ties count against the query: the rank of the first right answer
    is 1 + the number of wrong answers scoring at least as much, so a model giving equal scores everywhere gets
    recall 0, not an order-dependent number. Scores are computed `chunk` candidates x `query_chunk` queries at a
    time on `device` (default: the features' device), so memory stays bounded for 100k x 500k pairs; only one rank
    per query is kept. Mean rank is the arithmetic mean, median rank the midpoint of the two middle values for an
    even count. Every image needs at least one caption.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    n_images, n_texts = len(image_features), len(text_features)
    if text_features.ndim != 2 or image_features.ndim != 2 or text_features.shape[1] != image_features.shape[1]:
        raise DataError(f"features must be [images, D] and [texts, D], got {tuple(image_features.shape)} and "
                        f"{tuple(text_features.shape)}")
    if text_to_image.shape != (n_texts,) or n_texts == 0:
        raise DataError(f"text_to_image must give one image index per text ({n_texts}), got shape "
                        f"{tuple(text_to_image.shape)}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_images:
        raise DataError(f"text_to_image holds image indices outside 0..{n_images - 1}")
    counts = torch.bincount(text_to_image, minlength=n_images)
    if bool((counts == 0).any()):
        raise DataError(f"image {int((counts == 0).nonzero()[0])} has no caption "
                        f"({int((counts == 0).sum())} images without one); every image needs at least one")
    device = torch.device(device) if device is not None else image_features.device
    image_ids = torch.arange(n_images)
    captions_of = torch.split(text_to_image.argsort(stable=True), counts.tolist())
    t2i = _first_hit_ranks(text_features, text_to_image, image_features, image_ids,
                           list(text_to_image.split(1)), chunk, query_chunk, device)
    i2t = _first_hit_ranks(image_features, image_ids, text_features, text_to_image, list(captions_of),
                           chunk, query_chunk, device)
    out = {**_rank_metrics(t2i, ks, "image_retrieval"), **_rank_metrics(i2t, ks, "text_retrieval")}
    recalls = [v for k, v in out.items() if "_recall@" in k]
    out["mean_recall"] = sum(recalls) / len(recalls)
    out["headline"] = out["mean_recall"]
    out["images"], out["texts"] = float(n_images), float(n_texts)
    return out
