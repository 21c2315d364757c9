"""The GPU fast paths, checked on the CPU where their logic lives: fused attention kernels, channels_last ResNet
towers and the one-group-ahead device prefetch (same batches, same order, same data positions)."""

import pytest
import torch
import torch.nn.functional as F

from vlpretrain.data.prefetch import DevicePrefetch
from vlpretrain.errors import DataError
from vlpretrain.models import build_model
from vlpretrain.models.clip import is_conv_tower


def test_every_attention_block_uses_scaled_dot_product_attention(monkeypatch):
    """open_clip's blocks call nn.MultiheadAttention with need_weights=False, which goes through
    F.scaled_dot_product_attention (flash or memory-efficient kernels on a GPU). The text tower passes its causal
    mask explicitly, which rules out flash for it: benchmarks/gpu_suite.sh checks on a GPU that no block falls
    back to the math kernel."""
    model = build_model("tiny-vit").train()
    calls = []
    original = F.scaled_dot_product_attention

    def counted(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append(attn_mask is not None)
        return original(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    model(torch.randn(2, 3, 28, 28), torch.randint(0, 49408, (2, 16)))
    image_blocks = len(model.visual.transformer.resblocks)
    text_blocks = len(model.transformer.resblocks)
    assert len(calls) == image_blocks + text_blocks
    assert calls == [False] * image_blocks + [True] * text_blocks  # image: unmasked; text: causal mask


def test_channels_last_resnet_computes_the_same():
    """The trainer feeds a convolutional tower NHWC images on a GPU: the same values and gradients."""
    torch.manual_seed(0)
    model = build_model("tiny-resnet").train()
    assert is_conv_tower(model)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 24))
    grads = []
    outs = []
    for x in (images, images.contiguous(memory_format=torch.channels_last)):
        model.zero_grad()
        out = model(x, texts)
        image = out["image_features"]
        outs.append(image)
        w = torch.Generator().manual_seed(1)
        # not a plain sum: BatchNorm makes that one's gradient vanish before it
        (image * torch.randn(image.shape, generator=w)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.visual.conv1(images.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)  # the layout propagates
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():  # the same sums in another order: equal up to float rounding
        assert (grads[1][name] - g).norm() <= 1e-4 * g.norm() + 1e-6, name
    assert not is_conv_tower(build_model("tiny-vit"))  # a ViT's one conv is its patch embedding


def positions(n: int, pulled: list[int]):
    """Endless (epoch, index, images, tokens) with `pulled` counting what was taken."""
    i = 0
    while True:
        pulled.append(i)
        yield i // 5, i % 5, torch.full((2, 3, 4, 4), float(i)), torch.full((2, 8), i)
        i += 1


@pytest.mark.parametrize("group", [1, 3])
def test_device_prefetch_same_batches_one_group_ahead(group):
    pulled: list[int] = []
    reference = positions(0, [])
    prefetch = DevicePrefetch(positions(0, pulled), group, torch.device("cpu"))
    for step in range(4):
        got = next(prefetch)
        want = [next(reference) for _ in range(group)]
        assert [(e, i) for e, i, _, _ in got] == [(e, i) for e, i, _, _ in want]
        assert all(torch.equal(g[2], w[2]) and torch.equal(g[3], w[3]) for g, w in zip(got, want))
        # exactly one group ahead: the trainer saves the position of `got`, so what is in flight is re-read on resume
        assert len(pulled) == (step + 2) * group


def test_device_prefetch_raises_a_data_error_when_its_group_is_due():
    def failing():
        yield from ((0, i, torch.zeros(1), torch.zeros(1)) for i in range(2))
        raise DataError("shard-000003.tar: too many corrupt samples")

    prefetch = DevicePrefetch(failing(), 1, torch.device("cpu"))
    assert [i for _, i, _, _ in next(prefetch)] == [0]
    assert [i for _, i, _, _ in next(prefetch)] == [1]  # the error met while fetching ahead waits its turn
    with pytest.raises(DataError, match="shard-000003.tar"):
        next(prefetch)
