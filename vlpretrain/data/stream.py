"""The one protocol between data and the trainer: endless, resumable batches plus the counters worth logging.

`ShardLoader` implements it over webdataset shards; `EpochBatches` turns any function of (epoch, start batch)
into it (synthetic data for benchmarks and tests). The trainer saves the (epoch, index + 1) of the last batch it
trained on and resumes with `forever(epoch, index + 1)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from vlpretrain.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]  # images [B, 3, H, W], token ids [B, context]
Position = tuple[int, int, torch.Tensor, torch.Tensor]  # epoch, batch index in that epoch, images, token ids


class BatchStream(Protocol):
    """What `vlpretrain.train` consumes."""

    def forever(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Position]:
        """(epoch, index, images, tokens) from `epoch`/`start_batch` on, epoch after epoch."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters for `metrics.jsonl` (e.g. samples skipped by reason), keyed as they should be logged."""
        ...

    def normalize(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Model input in `dtype` from a batch's images, already on the training device (uint8 pixels normalised)."""
        ...


def forever_epochs(run_epoch: Callable[[int, int], Iterable[Batch]], epoch: int = 0,
                   start_batch: int = 0) -> Iterator[Position]:
    """Epoch after epoch of `run_epoch(epoch, start_batch)`; a source that stays empty for two epochs is an error
    (an endless loop otherwise)."""
    empty = 0
    while True:
        got = False
        for i, (images, tokens) in enumerate(run_epoch(epoch, start_batch), start=start_batch):
            got = True
            yield epoch, i, images, tokens
        empty = 0 if got else empty + 1
        if empty >= 2:
            raise DataError("the data source produced no batches for two epochs in a row")
        epoch, start_batch = epoch + 1, 0


class EpochBatches:
    """A `BatchStream` from a function (epoch, start batch) -> that epoch's batches from `start batch` on."""

    def __init__(self, run_epoch: Callable[[int, int], Iterable[Batch]]):
        self.run_epoch = run_epoch

    def forever(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Position]:
        return forever_epochs(self.run_epoch, epoch, start_batch)

    def metrics(self) -> dict[str, float]:
        return {}

    def normalize(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return images.to(dtype)
