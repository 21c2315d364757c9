"""Overlapped input: each optimizer step's micro-batches copied to the device while the previous step runs.

The loader's workers already decode ahead of the trainer; what is left on the critical path is the host-to-device
copy. `DevicePrefetch` keeps one group (one optimizer step's micro-batches) in flight: when the loop takes group N
it starts copying group N + 1 on a side CUDA stream, from pinned memory with non-blocking copies, and the compute
stream waits on that copy's event (a device-side wait; the host never blocks on it). Tensors handed to the compute
stream are marked with `record_stream`, so the caching allocator does not reuse their memory while it still reads
them.

On a CPU there is nothing to overlap: the same one-group-ahead logic runs with plain tensors, so every CPU test
goes through the exact order and data positions a GPU run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vlpretrain.data.stream import Position


class DevicePrefetch:
    """Groups of `group` positions from `source`, their tensors on `device`, one group copied ahead."""

    def __init__(self, source: Iterator[Position], group: int, device: torch.device):
        assert group >= 1, group
        self.source, self.group, self.device = source, group, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[list[Position], torch.cuda.Event | None] | None = None
        self._failed: BaseException | None = None  # raised while fetching ahead: surfaces when that group is due

    def __iter__(self) -> DevicePrefetch:
        return self

    def _start(self) -> tuple[list[Position], torch.cuda.Event | None]:
        """Take the next group from the source and start its copy (on the side stream on a GPU)."""
        items = [next(self.source) for _ in range(self.group)]
        if self.stream is None:
            return items, None
        with torch.cuda.stream(self.stream):
            moved = [(e, i, images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True))
                     for e, i, images, tokens in items]
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def __next__(self) -> list[Position]:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        current = self._ahead if self._ahead is not None else self._start()
        items, event = current
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # the device waits for the copy, the host does not
            for _, _, images, tokens in items:
                images.record_stream(compute)
                tokens.record_stream(compute)
        self._ahead = None
        try:
            self._ahead = self._start()  # the next step's copy overlaps this step's compute
        except Exception as e:  # a data error belongs to the step that would have used the group
            self._failed = e
        return items
