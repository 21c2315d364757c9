"""Overlapped input gives the batches of the plain stream, in order, on the device and in the training dtype."""

import torch

from vlpretrain.prefetch import prefetch


def batches(n: int):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        yield 0, i, torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 9, (2, 5), generator=g)


def test_prefetch_equals_the_plain_stream_on_the_cpu():
    got = list(prefetch(batches(4), torch.device("cpu"), torch.bfloat16))
    want = list(batches(4))
    assert [b[1] for b in got] == [0, 1, 2, 3]
    for (_, _, images, tokens), (_, _, images0, tokens0) in zip(got, want):
        assert images.dtype == torch.bfloat16 and torch.equal(images, images0.to(torch.bfloat16))
        assert torch.equal(tokens, tokens0)


def test_prefetch_keeps_uint8_images_for_the_device_side_normalisation():
    stream = ((0, 0, torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.long)),)
    (_, _, images, _), = list(prefetch(iter(stream), torch.device("cpu"), torch.float32))
    assert images.dtype == torch.uint8
