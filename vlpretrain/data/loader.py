"""The streaming loader: webdataset shards -> (images, tokens) batches for one rank, through DataLoader workers.

Each DataLoader worker runs the stages of `stages.py` on the shards its plan (`plan.py`) gives it (reading
`data.interleave_shards` of them at once) and yields whole batches with the counts of what it skipped; this process
sums those counts in `loader.stats`, logs each skip reason once, stops the run with a DataError when the error
budget is exceeded, and warns once when the first batches' captions are far less varied than the shards'.
With an open_clip transform the pixels stay uint8 from decode to batch (`pixels.py`: `data.fast_decode`,
`data.uint8_batches`); the trainer normalises them on its device, other callers get them normalised here.

Use (the trainer keeps the epoch and the batches consumed in it, and passes both on resume):

    loader = build_loader(cfg.data, transform, tokenizer, epoch=e, start_batch=b)
    for images, tokens in loader:      # len(loader) == loader.batches_per_epoch - b
        ...
    loader.set_epoch(e + 1)            # then iterate again

or, across epochs: `for epoch, index, images, tokens in loader.forever(e, b): ...`, saving (epoch, index + 1).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from functools import partial, reduce
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlpretrain import storage
from vlpretrain.config import DataConfig
from vlpretrain.data import stages
from vlpretrain.data.counts import ShardCounts, count_shards
from vlpretrain.data.pixels import Chain, split_transform
from vlpretrain.data.plan import EpochPlan, expand_shards, plan_epoch, plan_resampled, seed_of
from vlpretrain.data.stats import (
    CaptionDiversity,
    LoaderStats,
    WorkerStats,
    diversity_ratio,
    expected_distinct,
)
from vlpretrain.data.stream import Position, forever_epochs
from vlpretrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The error budget is judged once this many samples were met (or at the end of an epoch): a bad first batch
# alone does not stop a run.
BUDGET_MIN_SAMPLES = 1000
# A worker that reads this many samples beyond its shuffle buffer without one usable sample gives up.
STALL_SAMPLES = 10_000
# Batch diversity is checked once, on the first batches, against captions sampled from shards spread over the list:
# a batch holding under DEGENERATE_RATIO of the distinct captions a random batch would hold draws a warning.
DIVERSITY_CHECK_BATCHES = 8
DIVERSITY_PEEK_SHARDS = 32
DIVERSITY_PEEK_SAMPLES = 16
DEGENERATE_RATIO = 0.5


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Rank and world size: as given, else torch.distributed's when initialised, else $RANK/$WORLD_SIZE, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (r if rank is None else rank), (w if world_size is None else world_size)


def _transform_size(transform: Any) -> int | None:
    """The output size of an open_clip/torchvision transform (first sub-transform with an int or square `size`)."""
    for t in getattr(transform, "transforms", [transform]):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and size and all(isinstance(v, int) for v in size):
            return max(size)
    return None


class _EpochStream(IterableDataset):
    """What every DataLoader worker runs for one epoch of one rank: its share of the plan, as whole batches."""

    def __init__(self, loader: ShardLoader, plan: EpochPlan, epoch: int):
        self.cfg, self.plan, self.epoch = loader.cfg, plan, epoch
        self.rank, self.urls, self.groups = loader.rank, loader.urls, loader.groups
        self.expected, self.draft = loader.expected, loader.draft_size
        self.sample_transform, self.decode_tensors = loader.sample_transform, loader.decode_tensors
        self.tokenizer, self.keys = loader.tokenizer, loader.keys

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = self.plan.logical(info.id if info is not None else 0)
        stats = WorkerStats(stall_limit=self.cfg.shuffle_buffer + self.cfg.batch_size + STALL_SAMPLES)
        try:
            for images, tokens, delta in self._batches(worker, stats, in_main_process=info is None):
                yield images, tokens, delta, None
        except DataError as e:  # handed over as data: the main process raises it with a clean one-line message
            yield None, None, stats.take(), str(e)

    def _pipeline(self, shards, stats: WorkerStats, skipper: stages.Skipper, interleave_rng: random.Random,
                  shuffle_rng: random.Random, in_main_process: bool) -> Iterator[dict]:
        steps: list[Callable] = [
            partial(stages.read_shards, stats=stats, expected=self.expected, interleave=self.cfg.interleave_shards,
                    rng=interleave_rng),
            partial(stages.with_caption, stats=stats, keys=self.keys),
            partial(stages.shuffle, size=self.cfg.shuffle_buffer, rng=shuffle_rng),
            partial(stages.skip, skipper=skipper),
            partial(stages.decode, stats=stats, draft=self.draft, as_tensor=self.decode_tensors),
            partial(stages.transform, fn=self.sample_transform, keep_global_rng=in_main_process),
        ]
        return reduce(lambda stream, step: step(stream), steps, shards)

    def _batches(self, worker: int, stats: WorkerStats, in_main_process: bool) -> Iterator[tuple]:
        cfg, plan, epoch, rank = self.cfg, self.plan, self.epoch, self.rank
        mine = plan.workers[worker]
        skipper = stages.Skipper(mine.skip_batches * cfg.batch_size)
        if cfg.mode == "epoch":
            def one_pass(p: int) -> Iterator[dict]:
                shards = [(self.urls[i], seed_of("shard", cfg.seed, epoch, self.urls[i], p)) for i in mine.shards]
                mix = random.Random(seed_of("interleave", cfg.seed, epoch, rank, worker, p))
                rng = random.Random(seed_of("shuffle", cfg.seed, epoch, rank, worker, p))
                return self._pipeline(shards, stats, skipper, mix, rng, in_main_process)

            samples = stages.repeat_passes(one_pass, stats, f"rank {rank} worker {worker}")
        else:
            draws = stages.resampled_shards(self.groups, cfg.weights,
                                            random.Random(seed_of("draw", cfg.seed, epoch, rank, worker)),
                                            lambda d: seed_of("draw", cfg.seed, epoch, rank, worker, d))
            mix = random.Random(seed_of("interleave", cfg.seed, epoch, rank, worker))
            rng = random.Random(seed_of("shuffle", cfg.seed, epoch, rank, worker))
            samples = self._pipeline(draws, stats, skipper, mix, rng, in_main_process)
        yield from stages.batches(samples, cfg.batch_size, mine.batches - mine.skip_batches, self.tokenizer, stats)


def _passthrough(item: Any) -> Any:
    return item


def _cast(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return images.to(dtype)


class ShardLoader:
    """Batches `(images FloatTensor[B,3,H,W], tokens LongTensor[B,ctx])` of one epoch for one rank.

    With `defer_normalize` (and `data.uint8_batches`, an open_clip transform) images stay uint8 [B,3,H,W] for the
    training step to turn into model input on its device: `normalize(images.to(device), dtype)`.

    `batches_per_epoch` is the same on every rank (ranks step together); `len()` is what is left of this epoch after
    `start_batch`. `stats` sums good and skipped samples since the loader was built; `diversity` follows how often
    captions repeat within a batch (`repeated_captions`: the fraction of a batch's samples whose caption occurs more
    than once in it; `caption_diversity`: distinct captions per batch over what a random batch of captions sampled
    from the shards holds) and the loader warns once, early, when batches are far less varied than the data.
    """

    def __init__(self, cfg: DataConfig, transform: Callable, tokenizer: Callable[[list[str]], torch.Tensor], *,
                 rank: int, world_size: int, epoch: int = 0, start_batch: int = 0, image_size: int | None = None,
                 pin_memory: bool | None = None, defer_normalize: bool = False, counts: ShardCounts | None = None):
        cfg.validate()  # a DataConfig built in Python skips load_config
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.transform, self.tokenizer = cfg, transform, tokenizer
        self.rank, self.world_size = rank, world_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._set_pixel_path(transform, defer_normalize)
        self.keys = stages.SampleKeys.parse(cfg.image_key, cfg.text_key)
        groups = expand_shards(cfg.train)
        self.shard_counts = counts or count_shards_of(cfg)
        present = set(self.shard_counts.urls)
        self.groups = [[u for u in g if u in present] for g in groups]
        for entry, group in zip([cfg.train] if isinstance(cfg.train, str) else cfg.train, self.groups):
            if not group:
                raise DataError(f"data.train: none of the shards of {entry!r} exists")
        self.urls = [u for g in self.groups for u in g]
        self.counts = self.shard_counts.samples if cfg.mode == "epoch" else None
        self.expected = self.shard_counts.expected()
        size = image_size or cfg.image_size or _transform_size(transform)
        # a random crop of area fraction s needs size/sqrt(s) source pixels to stay sharp
        self.draft_size = math.ceil(size / math.sqrt(max(cfg.crop_scale[0], 0.05))) if size and cfg.augment \
            else size
        self.stats = LoaderStats()
        self.diversity = CaptionDiversity(DIVERSITY_CHECK_BATCHES)
        self._diversity_checked = False
        self._logged: set[str] = set()
        self.set_epoch(epoch, start_batch)

    def _set_pixel_path(self, transform: Callable, defer_normalize: bool) -> None:
        """Choose how a sample's pixels are decoded and transformed, and what form batches leave the workers in."""
        cfg, pixels = self.cfg, split_transform(transform)
        # a sample's transform, what the workers' batches hold, and what this process still does to them
        self.sample_transform: Callable = transform
        self.decode_tensors, self.uint8_batches = False, False
        self._normalize: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = _cast
        self._normalize_here = False
        if pixels is None:
            if cfg.uint8_batches or cfg.fast_decode:
                log.info("data.uint8_batches / data.fast_decode apply to open_clip's transforms (a Compose ending in "
                         "ToTensor, Normalize); %s is applied as it is", type(transform).__name__)
            return
        if cfg.fast_decode and pixels.tensor is not None:
            self.decode_tensors = True
            self.sample_transform = pixels.tensor if cfg.uint8_batches else Chain(pixels.tensor, pixels.normalize)
        elif cfg.uint8_batches:
            self.sample_transform = pixels.pil
        self.uint8_batches = cfg.uint8_batches
        if self.uint8_batches:
            self._normalize = pixels.normalize
            self._normalize_here = not defer_normalize

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Model input from a batch of this loader, on the batch's device: uint8 pixels normalised as the transform's
        Normalize would (fp32, then `dtype`); batches that are floats already are only cast."""
        return self._normalize(images, dtype)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to `epoch`, resuming after its first `start_batch` batches (which are skipped undecoded)."""
        self.epoch, self.start_batch = epoch, start_batch
        cfg, workers = self.cfg, max(1, self.cfg.workers)
        if cfg.mode == "epoch":
            assert self.counts is not None
            self.plan = plan_epoch(self.counts, seed=cfg.seed, epoch=epoch, rank=self.rank,
                                   world_size=self.world_size, workers=workers, batch_size=cfg.batch_size,
                                   start_batch=start_batch)
        else:
            assert cfg.train_num_samples is not None
            self.plan = plan_resampled(cfg.train_num_samples, world_size=self.world_size, workers=workers,
                                       batch_size=cfg.batch_size, start_batch=start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the whole current epoch, equal on every rank."""
        return self.plan.batches

    def __len__(self) -> int:
        return max(0, self.plan.batches - self.start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.cfg.workers
        loader = DataLoader(_EpochStream(self, self.plan, self.epoch), batch_size=None, num_workers=workers,
                            collate_fn=_passthrough, pin_memory=self.pin_memory,
                            prefetch_factor=2 if workers > 0 else None, persistent_workers=False,
                            # its own generator: drawing worker seeds must not move the trainer's global RNG
                            generator=torch.Generator().manual_seed(seed_of("loader", self.cfg.seed, self.epoch)))
        for images, tokens, delta, error in loader:
            self._absorb(delta)
            if error is not None:
                raise DataError(error)
            self._check_budget(final=False)
            self._check_diversity(tokens)
            yield (self._normalize(images, torch.float32) if self._normalize_here else images), tokens
        self._check_budget(final=True)

    def forever(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Position]:
        """(epoch, batch index in epoch, images, tokens) from `epoch`/`start_batch` on, epoch after epoch.

        A trainer that saves the last (epoch, index + 1) it trained on resumes exactly where it stopped.
        """

        def run_epoch(e: int, b: int) -> ShardLoader:
            self.set_epoch(e, b)
            return self

        return forever_epochs(run_epoch, epoch, start_batch)

    def metrics(self) -> dict[str, float]:
        """A metrics line's `data/...` figures: good and skipped sample counts since the loader was built (as batches
        leave it: the trainer, which reads one step ahead, logs the samples its steps took as `data/samples`), and
        the batch caption-diversity means since the previous call."""
        missing = {"missing_shards": len(self.shard_counts.missing)} if self.shard_counts.missing else {}
        return {f"data/{k}": v for k, v in {**self.stats.as_dict(), **self.diversity.take(), **missing}.items()}

    def _check_diversity(self, tokens: torch.Tensor) -> None:
        # token rows stand for captions: equal rows are what the text tower cannot tell apart
        self.diversity.add([row.numpy().tobytes() for row in tokens.cpu()])
        if self._diversity_checked or not self.diversity.ready:
            return
        self._diversity_checked = True
        local = [u for u in self.urls if not storage.is_remote(u)]
        spread = local[::max(1, len(local) // DIVERSITY_PEEK_SHARDS)][:DIVERSITY_PEEK_SHARDS]
        captions = stages.peek_captions(spread, DIVERSITY_PEEK_SAMPLES, self.keys)
        if not captions:
            return
        reference = [row.numpy().tobytes() for row in self.tokenizer(captions).cpu()]
        self.diversity.expected = expected_distinct(reference, self.cfg.batch_size)
        ratio = diversity_ratio(self.diversity.first, reference)
        if ratio < DEGENERATE_RATIO:
            first = self.diversity.first
            held = sum(len(set(b)) for b in first) / len(first)
            log.warning("batches look degenerate: the first %d held %.1f distinct captions each, %.0f%% of what "
                        "random batches of these shards would hold (captions sampled from %d shards); the shards are "
                        "probably sorted (by class, date or source). Re-write them shuffled (vlpretrain make-shards "
                        "without --keep-order) or raise data.interleave_shards (now %d) or data.shuffle_buffer "
                        "(now %d)", len(first), held, 100 * ratio, len(spread), self.cfg.interleave_shards,
                        self.cfg.shuffle_buffer)

    def _absorb(self, delta: dict[str, Any]) -> None:
        for reason, example in self.stats.merge(delta):
            if reason not in self._logged:
                self._logged.add(reason)
                log.warning("skipping samples: %s (first: %s); later ones are only counted in loader.stats",
                            reason, example)

    def _check_budget(self, final: bool) -> None:
        total = self.stats.samples + self.stats.bad
        if not total or (not final and total < BUDGET_MIN_SAMPLES):
            return
        if self.stats.bad_fraction() > self.cfg.error_budget:
            worst = self.stats.worst_shard()
            assert worst is not None
            name, counts = worst
            raise DataError(f"{self.stats.bad} of {total} samples ({self.stats.bad_fraction():.1%}) were bad, over "
                            f"data.error_budget {self.cfg.error_budget:.1%}; worst shard {name} "
                            f"({', '.join(f'{r}: {n}' for r, n in sorted(counts.items()))})")


def count_shards_of(cfg: DataConfig) -> ShardCounts:
    """What `data.train` holds (`counts.count_shards` with the data config's settings): exact counts for epoch
    mode, whatever folder-level sidecars say for resampled mode, which never scans."""
    urls = [u for g in expand_shards(cfg.train) for u in g]
    index = [cfg.index] if isinstance(cfg.index, str) else cfg.index
    return count_shards(urls, need_counts=cfg.mode == "epoch", num_samples=cfg.train_num_samples,
                        missing=cfg.missing_shards, index=index)


def build_loader(cfg: DataConfig, transform: Callable, tokenizer: Callable[[list[str]], torch.Tensor], *,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0, start_batch: int = 0,
                 image_size: int | None = None, pin_memory: bool | None = None,
                 defer_normalize: bool = False, counts: ShardCounts | None = None) -> ShardLoader:
    """The loader of `cfg` for this rank (see `ShardLoader`); rank/world size default to torch.distributed or env.

    `transform` maps a PIL RGB image to a tensor (e.g. `vlpretrain.models.image_transform(model, train=True)`),
    `tokenizer` maps a list of captions to token ids. `image_size` (else `cfg.image_size`, else the transform's)
    sets how far large JPEGs may be draft-decoded. `pin_memory` defaults to whether CUDA is available.
    `defer_normalize` leaves uint8 batches (`data.uint8_batches`) for the training step to normalise on its device
    with `loader.normalize`; without it this process normalises them and batches are floats either way.
    `counts` (`count_shards_of(cfg)`, which the trainer computes once per run and shares) saves counting here.
    """
    rank, world_size = dist_rank_world(rank, world_size)
    return ShardLoader(cfg, transform, tokenizer, rank=rank, world_size=world_size, epoch=epoch,
                       start_batch=start_batch, image_size=image_size, pin_memory=pin_memory,
                       defer_normalize=defer_normalize, counts=counts)
