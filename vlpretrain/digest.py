"""A digest of a model's weights: the cache key of whatever was computed from them (zeroshot's feature and head
caches, curation's embeddings). Low-level on purpose: it imports torch only."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import nn

DigestScope = Literal["image", "model"]


def weights_digest(model: nn.Module, *, scope: DigestScope) -> str:
    """SHA-256 of weights (names, dtypes, shapes and bytes): the cache key of what was computed from them.

    scope "image" hashes only the image tower (`model.visual` when the model has one), so retraining the text tower
    keeps cached image features valid; scope "model" hashes every parameter and buffer (zero-shot heads depend
    on both towers and the temperature).
    """
    assert scope in ("image", "model"), scope
    module = getattr(model, "visual", model) if scope == "image" else model
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
