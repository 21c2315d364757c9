"""The one image-feature path of zeroshot: device choice, eval mode, encoding, weight digests, an on-disk cache.

Zero-shot evaluation, linear probes and few-shot adaptation all encode images with `encode_images`. Features can be
cached once per (image-tower weights, benchmark, split) as safetensors (never pickle), so a sweep of probe settings,
or a second run, never runs the model again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vlpretrain.digest import DigestScope, weights_digest  # noqa: F401  (zeroshot.features.weights_digest stays importable)
from vlpretrain.errors import ConfigError, DataError, VLPretrainError, without_worker_traceback
from vlpretrain.progress import progress as progress_bar
from vlpretrain.stopping import Interrupted, StopCheck, check_stop

log = logging.getLogger(__name__)

CACHE_FORMAT = "vlpretrain-features-v1"


def resolve_device(device: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """`device` when given, else where `model`'s parameters are, else CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None) if model is not None else None
    if first is not None:
        return first.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients for the block, then the model's previous mode (a trainer may call us mid-run)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _batches(data: Dataset | DataLoader | Iterable, batch_size: int, workers: int, device: torch.device) -> Iterable:
    """A DataLoader over `data` in its own order (no shuffling), or `data` itself when it already yields batches."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda")
    return data


def _worker_errors_cleaned(batches: Iterable, should_stop: StopCheck | None = None) -> Iterator:
    """`batches`, with a worker's DataError (an unreadable image, say) raised as its own one-line message, and the
    loader's error for workers that exited raised as Interrupted when a stop was requested (a terminal's Ctrl-C
    reaches the workers too, and they exit)."""
    try:
        yield from batches
    except VLPretrainError as e:
        raise without_worker_traceback(e) from None
    except RuntimeError:
        if should_stop is not None and should_stop():
            raise Interrupted("stop requested") from None
        raise


def _encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image features from an open_clip-style model (`encode_image`) or from any plain image encoder."""
    encode = getattr(model, "encode_image", None)
    return encode(images) if callable(encode) else model(images)


def spread_subset(dataset: Dataset, max_images: int | None) -> Dataset:
    """At most `max_images` evenly spaced items: class-folder layouts list images class by class, so a prefix
    would cover only the first classes."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_images is None or max_images >= n:
        return dataset
    if max_images < 1:
        raise ConfigError(f"max_images: expected a positive number, got {max_images}")
    return Subset(dataset, torch.linspace(0, n - 1, max_images).round().long().unique().tolist())


def encode_images(model: nn.Module, data: Dataset | DataLoader | Iterable, *, batch_size: int = 256,
                  workers: int = 0, device: str | torch.device | None = None, progress: bool = False,
                  desc: str = "images", should_stop: StopCheck | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 image features [N, D] (as the model gives them, not normalised) and int64 labels [N], on the CPU.

    The one feature pass of zeroshot: zero-shot evaluation, the probe's cache and few-shot adaptation all use it.
    The model runs under `eval_mode` on `device` (default: where it is); the caller gives `data` an eval-mode
    transform, since augmentation would make the features of a frozen model noisy. `should_stop` is asked before
    each batch: when it says so, `vlpretrain.stopping.Interrupted` is raised (a preempted job must not finish the set).
    """
    device = resolve_device(device, model)
    model.to(device)
    total = len(data) if isinstance(data, Dataset) and hasattr(data, "__len__") else None
    feats, labels = [], []
    with eval_mode(model), progress_bar(total, desc, "img", enabled=progress) as bar:
        for i, batch in enumerate(_worker_errors_cleaned(_batches(data, batch_size, workers, device), should_stop)):
            check_stop(should_stop)
            if not isinstance(batch, list | tuple) or len(batch) < 2:
                raise DataError(f"batch {i}: expected (images, labels), got {type(batch).__name__}")
            images, y = batch[0], batch[1]
            out = _encode(model, images.to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(y, dtype=torch.long).reshape(-1).cpu())
            bar.update(len(labels[-1]))
    if not feats:
        raise DataError("no samples to extract features from (the dataset is empty)")
    x, y = torch.cat(feats), torch.cat(labels)
    if len(x) != len(y):
        raise DataError(f"{len(x)} features but {len(y)} labels: each sample must carry one label")
    return x, y


def cache_path(cache_dir: str | os.PathLike, digest: str, key: str) -> Path:
    """Where the features of `key` (e.g. "cifar10/test") for weights `digest` live.

    The file name keeps a readable form of the key plus a hash of it, so distinct keys never share a file.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:80] or "features"
    tag = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(cache_dir) / digest[:16] / f"{readable}-{tag}.safetensors"


def _read_cache(path: Path, digest: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (features, labels), or None when the file is missing, unreadable or for another model/key."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        log.warning("%s: unreadable feature cache (%s); extracting again", path, e)
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("digest") != digest or meta.get("key") != key:
        log.warning("%s: feature cache belongs to another model or key; extracting again", path)
        return None
    x, y = tensors.get("features"), tensors.get("labels")
    if x is None or y is None or x.ndim != 2 or y.shape != (x.shape[0],):
        log.warning("%s: feature cache has wrong tensors; extracting again", path)
        return None
    return x, y


def cached_features(model: nn.Module, key: str, loader_fn: Callable[[], Dataset | DataLoader | Iterable],
                    cache_dir: str | os.PathLike, *, digest: str | None = None, batch_size: int = 256,
                    device: str | torch.device | None = None, workers: int = 0, progress: bool = False,
                    should_stop: StopCheck | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of `key` (benchmark/split) from the cache, extracting and storing them on a miss.

    `loader_fn` is only called on a miss, so a cached split needs neither its images nor the model to run.
    Pass `digest` (from `weights_digest(model, scope="image")`) when probing several splits to hash the weights once.
    """
    digest = digest or weights_digest(model, scope="image")
    path = cache_path(cache_dir, digest, key)
    hit = _read_cache(path, digest, key)
    if hit is not None:
        return hit
    x, y = encode_images(model, loader_fn(), batch_size=batch_size, device=device, workers=workers,
                         progress=progress, desc=f"features {key}", should_stop=should_stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half file that a later run would trust.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"features": x.contiguous(), "labels": y.contiguous()}, str(tmp),
              metadata={"format": CACHE_FORMAT, "digest": digest, "key": key})
    os.replace(tmp, path)
    return x, y
