"""One pass over the images and captions of a dataset, cached per shard, so that every later decision is cheap.

For each sample the pass keeps: a hash of its decoded pixels (exact duplicates), a thumbnail descriptor (the
differences of a 12x12 grey image, of unit length: near duplicates, robust to resizing and re-encoding), and, with
a model, its image and caption embeddings (unit length; their dot product is the CLIP score DataComp filters on). A sample that
cannot be read keeps its reason instead.

The cache is one safetensors file per (shard, model): written under a temporary name and renamed when whole, and
checked against the shard's size and modification time and the model's digest when read, so a killed pass
continues with the shards it had not finished and a half-written file is never taken for a whole one. Shards are
split across processes (rank r of w embeds shards r, r + w, ...), by the launcher's RANK / WORLD_SIZE or by
`workers` processes started here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

from vlpretrain import storage
from vlpretrain.curation.read import Bad, read_samples
from vlpretrain.digest import weights_digest
from vlpretrain.errors import ConfigError
from vlpretrain.formats import to_rgb
from vlpretrain.progress import progress as progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = "vlpretrain-curation-v2"  # v2: 12x12 thumbnails (v1's were 16x16)
THUMB_SIDE = 12
THUMB_DIM = 2 * (THUMB_SIDE - 1) ** 2
# Thumbnail cosine at or above which two images count as copies (decontamination's and the overlap's default; the
# value benchmarks/curation.py measured: every planted Fashion-MNIST test copy found, 0.3% of training images flagged)
NEAR_COSINE = 0.99
CAPTION_MEMO = 50_000  # distinct captions a Scorer keeps the embeddings of (100 MB at width 512)
SAVE_EVERY = 2048  # samples of a shard between saves of its rows so far (a killed pass resumes from the last)


# ---------------------------------------------------------------------------------------------------------------
# what is computed per image


def thumbnail(img: Image.Image) -> np.ndarray:
    """A near-duplicate descriptor: the image as 12x12 grey (Lanczos), its horizontal and vertical differences,
    unit length (float32 [242]). Differences, not grey levels: on Fashion-MNIST, grey thumbnails of different
    garments are near each other (a silhouette on black), their differences much less. 12, not more: a copy
    resized down to 20 px and saved as JPEG keeps block noise and resampling phase near its own resolution, and a
    16x16 thumbnail (close to 20 px) kept enough of it to miss 18% of such copies at 0.985, and 8.5% even at the
    threshold that flags 1% of other images; well below the copy's resolution, the Lanczos filter averages that
    noise away (benchmarks/curation.py: copies of 20-112 px all at cosine >= 0.99)."""
    g = np.asarray(img.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS), dtype=np.float32)
    x = np.concatenate([np.diff(g, axis=1)[:-1].reshape(-1), np.diff(g, axis=0)[:, :-1].reshape(-1)])
    norm = float(np.linalg.norm(x))
    return x / norm if norm > 1e-6 else np.zeros_like(x)  # a flat image matches nothing (exact hashes catch copies)


def pixel_hash(img: Image.Image) -> bytes:
    """16 bytes identifying the decoded RGB pixels (size included): equal for byte-different files of one image."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.width}x{img.height}|".encode())
    h.update(img.tobytes())
    return h.digest()


def decode(data: bytes) -> Image.Image:
    """Image bytes as an 8-bit RGB PIL image (16-bit grey keeps its brightness); raises on a corrupt file."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


@dataclass
class Scorer:
    """The model side of the pass: a CLIP-style model, its tokenizer and eval transform, and the cache key.

    `spec` (model path or architecture, local weights) lets `workers` processes load the same model themselves.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: Callable[[Image.Image], torch.Tensor]
    spec: tuple[str, str | None] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    digest: str = ""
    _captions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # caption -> embedding, seen so far

    def __post_init__(self) -> None:
        if not self.digest:
            h = hashlib.sha256(weights_digest(self.model, scope="model").encode())
            h.update(repr(self.transform).encode())
            h.update(f"{type(self.tokenizer).__name__}|{getattr(self.tokenizer, 'context_length', '')}".encode())
            self.digest = h.hexdigest()
        self.model.to(self.device).eval()

    @torch.no_grad()
    def encode(self, images: list[Image.Image], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit-length image and caption embeddings (float32 [n, D] each)."""
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        image = F.normalize(self.model.encode_image(x).float(), dim=-1)
        return image.cpu().numpy(), self.encode_captions(captions)

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> np.ndarray:
        """Unit-length caption embeddings (float32 [n, D]); a caption seen before is not encoded again (templated and
        boilerplate captions repeat: on the demo shards the text tower would otherwise cost a third of the pass)."""
        new = [c for c in dict.fromkeys(captions) if c not in self._captions]
        if new:
            text = F.normalize(self.model.encode_text(self.tokenizer(new).to(self.device)).float(), dim=-1)
            if len(self._captions) + len(new) > CAPTION_MEMO:
                self._captions.clear()
            self._captions.update(zip(new, text.cpu().numpy()))
        return np.stack([self._captions[c] for c in captions]) if captions else np.zeros((0, 0), np.float32)


def load_scorer(model: str, pretrained: str | None = None, device: str | None = None) -> Scorer:
    """A Scorer for an export of ours or an open_clip architecture with local weights (`vlpretrain.load_model`)."""
    from vlpretrain.errors import VLPretrainError
    from vlpretrain.models import get_tokenizer, image_transform, load_model, read_export_config

    m = load_model(model, pretrained)
    cfg = read_export_config(model)
    try:
        tokenizer = get_tokenizer(cfg.name if cfg is not None else model)
    except VLPretrainError:
        from vlpretrain.models.openclip import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # an unknown architecture: open_clip's default BPE
    return Scorer(m, tokenizer, image_transform(m, train=False), spec=(model, pretrained),
                  device=torch.device(device or "cpu"))


# ---------------------------------------------------------------------------------------------------------------
# embeddings of one shard, and of a dataset


@dataclass
class Embeddings:
    """Per-sample results of the pass, in shard order (a shard's, or a dataset's shards one after another).

    `bad` maps a row to (reason, detail) for samples that could not be read: they have zero vectors.
    """

    keys: list[str]
    captions: list[str]
    hashes: np.ndarray  # uint8 [n, 16]
    thumbs: np.ndarray  # float32 [n, THUMB_DIM]
    image: np.ndarray | None = None  # float32 [n, D], unit rows
    text: np.ndarray | None = None
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)
    shard: np.ndarray | None = None  # int32 [n]: which input shard a row came from (a dataset's)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def valid(self) -> np.ndarray:
        """Rows that are usable samples (bool [n])."""
        ok = np.ones(len(self), dtype=bool)
        ok[list(self.bad)] = False
        return ok

    @property
    def scores(self) -> np.ndarray | None:
        """CLIP score of each pair: cosine of image and caption embeddings (float32 [n]; NaN for bad rows)."""
        if self.image is None or self.text is None:
            return None
        s = (self.image * self.text).sum(1).astype(np.float32)
        s[~self.valid] = np.nan
        return s

    @staticmethod
    def concat(parts: Sequence[Embeddings]) -> Embeddings:
        """The rows of several shards' embeddings, one after another, with each row's shard index."""
        offsets = np.cumsum([0] + [len(p) for p in parts])
        with_model = all(p.image is not None for p in parts) and bool(parts)

        def stacked(blocks: list[np.ndarray]) -> np.ndarray:
            width = max(b.shape[1] for b in blocks)  # a shard of only unreadable samples has width 0
            return np.concatenate([b if b.shape[1] == width else np.zeros((len(b), width), np.float32)
                                   for b in blocks])

        return Embeddings(
            [k for p in parts for k in p.keys], [c for p in parts for c in p.captions],
            np.concatenate([p.hashes for p in parts]) if parts else np.zeros((0, 16), np.uint8),
            np.concatenate([p.thumbs for p in parts]) if parts else np.zeros((0, THUMB_DIM), np.float32),
            stacked([p.image for p in parts]) if with_model else None,  # type: ignore[misc]
            stacked([p.text for p in parts]) if with_model else None,  # type: ignore[misc]
            {int(o) + i: b for p, o in zip(parts, offsets) for i, b in p.bad.items()},
            np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]) if parts
            else np.zeros(0, np.int32))


def embed_images(images: Sequence[Image.Image], scorer: Scorer | None,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """Thumbnail descriptors and (with a scorer) image embeddings of PIL images: a benchmark's test images."""
    thumbs = np.stack([thumbnail(to_rgb(im)) for im in images]) if len(images) else \
        np.zeros((0, THUMB_DIM), np.float32)
    if scorer is None:
        return thumbs, None
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([scorer.transform(to_rgb(im)) for im in images[i:i + batch_size]]).to(scorer.device)
            feats.append(F.normalize(scorer.model.encode_image(x).float(), dim=-1).cpu().numpy())
    return thumbs, np.concatenate(feats) if feats else None


def embed_shard(url: str, scorer: Scorer | None, batch_size: int = 256, *, done: Embeddings | None = None,
                save_every: int = 0, save: Callable[[Embeddings], None] | None = None) -> Embeddings:
    """Read, decode and embed every sample of one shard. `done` holds the results of the shard's first rows (what a
    killed pass saved): those samples are read past, not decoded or embedded again. With `save`, every
    `save_every` rows the results so far are handed to it."""
    keys: list[str] = []
    captions: list[str] = []
    hashes: list[bytes] = []
    thumbs: list[np.ndarray] = []
    bad: dict[int, tuple[str, str]] = {}
    pending: list[tuple[int, Image.Image, str]] = []
    rows: list[int] = []
    image: list[np.ndarray] = []
    text: list[np.ndarray] = []
    if done is not None:
        keys, captions, bad = list(done.keys), list(done.captions), dict(done.bad)
        hashes, thumbs = [h.tobytes() for h in done.hashes], list(done.thumbs)
        if scorer is not None and done.image is not None and done.text is not None and done.valid.any():
            rows = [int(r) for r in np.flatnonzero(done.valid)]
            image, text = [done.image[rows]], [done.text[rows]]
    skip, saved = len(keys), len(keys)

    def flush() -> None:
        if scorer is not None and pending:
            i, t = scorer.encode([p[1] for p in pending], [p[2] for p in pending])
            rows.extend(p[0] for p in pending)
            image.append(i)
            text.append(t)
        pending.clear()

    def so_far() -> Embeddings:
        out = Embeddings(list(keys), list(captions), np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, 16).copy(),
                         np.stack(thumbs) if thumbs else np.zeros((0, THUMB_DIM), np.float32), bad=dict(bad))
        if scorer is not None:
            out.image, out.text = _scatter(image, rows, len(keys)), _scatter(text, rows, len(keys))
        return out

    for index, s in enumerate(read_samples(url)):
        if index < skip:
            if s.key != keys[index]:  # not the shard the saved rows came from: start it over
                log.warning("%s: sample %d is %s, not %s as saved; embedding the shard from its start", url, index,
                            s.key, keys[index])
                return embed_shard(url, scorer, batch_size, save_every=save_every, save=save)
            continue
        row = len(keys)
        keys.append(s.key)
        captions.append("" if isinstance(s, Bad) else s.caption)
        try:
            if isinstance(s, Bad):
                raise _Unusable(s.reason, s.detail)
            try:
                img = decode(s.members[s.image_ext])
            except Exception as e:  # PIL raises many types for bad data
                raise _Unusable("undecodable image", f"{s.key}.{s.image_ext}: {type(e).__name__}: {e}") from None
        except _Unusable as u:
            bad[row] = (u.reason, u.detail)
            hashes.append(bytes(16))
            thumbs.append(np.zeros(THUMB_DIM, np.float32))
        else:
            hashes.append(pixel_hash(img))
            thumbs.append(thumbnail(img))
            pending.append((row, img, s.caption))
            if len(pending) >= batch_size:
                flush()
        if save is not None and save_every > 0 and len(keys) - saved >= save_every:
            flush()
            save(so_far())
            saved = len(keys)
    flush()
    return so_far()


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _scatter(blocks: list[np.ndarray], rows: list[int], n: int) -> np.ndarray:
    """Embeddings of the usable rows placed at their rows of an [n, D] array; unusable rows stay zero."""
    width = blocks[0].shape[1] if blocks else 0
    out = np.zeros((n, width), np.float32)
    if blocks:
        out[rows] = np.concatenate(blocks)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the cache


def cache_tag(scorer: Scorer | None) -> str:
    """The cache folder of a model's embeddings ("pixels" without a model: hashes and thumbnails only)."""
    return "pixels" if scorer is None else scorer.digest[:16]


def cache_file(cache_dir: str | os.PathLike, tag: str, url: str) -> Path:
    """Where the embeddings of shard `url` live (a readable name plus a hash of the full url)."""
    name = storage.basename(url).removesuffix(".tar")
    return Path(cache_dir) / tag / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}.safetensors"


def partial_file(path: Path) -> Path:
    """Where the first rows of a shard being embedded are saved (`embed_shards`' save_every)."""
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.partial.safetensors")


def _identity(url: str) -> dict[str, Any]:
    if storage.is_remote(url):
        return {"url": url}
    st = os.stat(storage.local_path(url))
    return {"url": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_cached(path: Path, tag: str, url: str) -> Embeddings | None:
    """The cached embeddings of `url`, or None when missing, unreadable, or made from another shard or model."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("format") != CACHE_FORMAT or meta.get("tag") != tag or \
                json.loads(meta.get("shard", "{}")) != _identity(url):
            return None
        rows = json.loads(meta["rows"])
        bad = {int(k): tuple(v) for k, v in rows["bad"].items()}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable embedding cache (%s); embedding the shard again", path, e)
        return None
    return Embeddings(rows["keys"], rows["captions"], tensors["hashes"], tensors["thumbs"], tensors.get("image"),
                      tensors.get("text"), bad)  # type: ignore[arg-type]


def write_cached(path: Path, emb: Embeddings, tag: str, url: str) -> None:
    """Store `emb` for `url` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"hashes": emb.hashes, "thumbs": emb.thumbs}
    if emb.image is not None and emb.text is not None:
        tensors |= {"image": emb.image, "text": emb.text}
    rows = {"keys": emb.keys, "captions": emb.captions, "bad": {str(k): list(v) for k, v in emb.bad.items()}}
    meta = {"format": CACHE_FORMAT, "tag": tag, "shard": json.dumps(_identity(url)), "rows": json.dumps(rows)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def embed_shards(urls: Sequence[str], cache_dir: str | os.PathLike, scorer: Scorer | None, *, rank: int = 0,
                 world: int = 1, workers: int = 1, batch_size: int = 256, progress: bool = True,
                 after_shard: Callable[[str], None] | None = None, save_every: int = SAVE_EVERY) -> int:
    """Make sure this rank's share of shards (rank, rank + world, ...) has cached embeddings; returns how many
    shards were embedded now (the others were cached). `workers` > 1 splits the share over that many processes,
    each loading the model from `scorer.spec`. `after_shard(url)` is called after each shard is stored. Every
    `save_every` samples of a shard, the rows so far are saved beside its cache file, so a killed pass continues
    within the shard (0: whole shards only)."""
    tag = cache_tag(scorer)
    share = [u for u in list(urls)[rank::world] if read_cached(cache_file(cache_dir, tag, u), tag, u) is None]
    if not share:
        return 0
    if workers > 1:
        if scorer is not None and scorer.spec is None:
            raise ConfigError("--workers > 1 needs a model given by path or name (each process loads its own)")
        ctx = multiprocessing.get_context("spawn")  # fork after torch's threads started can hang the children
        spec = None if scorer is None else (*scorer.spec, str(scorer.device))  # type: ignore[misc]
        procs = [ctx.Process(target=_worker, args=(share[w::workers], str(cache_dir), spec, batch_size, workers,
                                                   save_every))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise ConfigError(f"{len(failed)} embedding worker(s) failed (exit {failed[0]}); see their messages above")
        return len(share)
    with progress_bar(len(share), f"embed {tag}", "shard", enabled=progress) as bar:
        for url in share:
            path = cache_file(cache_dir, tag, url)
            part = partial_file(path)
            emb = embed_shard(url, scorer, batch_size, done=read_cached(part, tag, url), save_every=save_every,
                              save=lambda e, part=part, url=url: write_cached(part, e, tag, url))
            write_cached(path, emb, tag, url)
            part.unlink(missing_ok=True)
            bar.update(1)
            if after_shard is not None:
                after_shard(url)
    return len(share)


def _worker(urls: list[str], cache_dir: str, spec: tuple[str, str | None, str] | None, batch_size: int,
            workers: int, save_every: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    scorer = None if spec is None else load_scorer(spec[0], spec[1], spec[2])
    embed_shards(urls, cache_dir, scorer, batch_size=batch_size, progress=False, save_every=save_every)


def load_embeddings(urls: Sequence[str], cache_dir: str | os.PathLike, scorer: Scorer | None) -> Embeddings | None:
    """Every shard's cached embeddings, concatenated; None while any shard's are missing."""
    tag = cache_tag(scorer)
    parts = [read_cached(cache_file(cache_dir, tag, u), tag, u) for u in urls]
    if any(p is None for p in parts):
        return None
    return Embeddings.concat(parts)  # type: ignore[arg-type]
