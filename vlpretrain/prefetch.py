"""Overlapped input: the next batch is copied to the device while the current step runs.

On CUDA the loader's batches arrive in pinned memory, so `non_blocking` copies on a side stream overlap with the
step's kernels; the main stream waits for the copy only when it uses the batch. On the CPU the copy is the
identity and the stream is the plain iterator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vlpretrain.data.stream import Position


def to_device(batch: Position, device: torch.device, dtype: torch.dtype) -> Position:
    """(epoch, index, images in `dtype`, tokens) on `device`, copied without blocking the host."""
    epoch, index, images, tokens = batch
    images = images.to(device, non_blocking=True)
    images = images.to(dtype) if images.is_floating_point() else images  # uint8 batches are normalised later
    return epoch, index, images, tokens.to(device, non_blocking=True)


def prefetch(batches: Iterator[Position], device: torch.device, dtype: torch.dtype) -> Iterator[Position]:
    """`batches` on `device`, each copied one step ahead (on a side CUDA stream when there is one)."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device, dtype)
        return
    stream = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)

    def stage() -> Position | None:
        nxt = next(batches, None)
        if nxt is None:
            return None
        with torch.cuda.stream(stream):
            return to_device(nxt, device, dtype)

    ready = stage()
    while ready is not None:
        current.wait_stream(stream)
        for t in ready[2:]:
            t.record_stream(current)  # the caching allocator must not reuse it while the step still reads it
        batch, ready = ready, stage()
        yield batch
