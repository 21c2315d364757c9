"""Contrastive losses against hand computations, open_clip's ClipLoss, and their local/chunked forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from vlpretrain.loss import ClipLoss, SigLipLoss, cross_entropy_rows


def feats(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    s = torch.tensor([7.5], dtype=torch.float64, requires_grad=True)
    return i, t, s


def hand_infonce(i, t, s):
    """CLIP loss written out with explicit loops over rows."""
    n = i.shape[0]
    total = 0.0
    for k in range(n):
        row = [s[0] * (i[k] @ t[j]) for j in range(n)]
        col = [s[0] * (t[k] @ i[j]) for j in range(n)]
        total = total + (torch.logsumexp(torch.stack(row), 0) - row[k]) + (torch.logsumexp(torch.stack(col), 0) - col[k])
    return total / (2 * n)


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def test_infonce_matches_hand_computation():
    i, t, s = feats()
    ours = ClipLoss()(i, t, s)
    ref = hand_infonce(i, t, s)
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, b in zip(grads(ours, i, t, s), grads(hand_infonce(i, t, s), i, t, s)):
        assert torch.allclose(a, b, atol=1e-12)


def test_infonce_known_value():
    # orthonormal perfectly matched pairs, scale 1: each row is CE with logit 1 on target, 0 elsewhere
    e = torch.eye(4, dtype=torch.float64)
    loss = ClipLoss()(e, e, torch.tensor([1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(math.e + 3) - 1, abs=1e-12)


def test_matches_open_clip_loss():
    i, t, s = feats(8, 16, seed=3)
    ours = ClipLoss()(i, t, s)
    ref = OpenClipLoss()(i, t, s[0])
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, b in zip(grads(ours, i, t, s), grads(OpenClipLoss()(i, t, s[0]), i, t, s)):
        assert torch.allclose(a, b, atol=1e-12)


def test_temperature_clamped_at_100():
    i, t, _ = feats()
    big = torch.tensor([500.0], dtype=torch.float64, requires_grad=True)
    assert torch.allclose(ClipLoss()(i, t, big), ClipLoss()(i, t, torch.tensor([100.0], dtype=torch.float64)))
    (g,) = grads(ClipLoss()(i, t, big), big)
    assert g.item() == 0.0


@pytest.mark.parametrize("chunk", [1, 2, 4, 5])
def test_chunked_equals_full(chunk):
    i, t, s = feats(7, 6, seed=1)
    full = ClipLoss()(i, t, s)
    ch = ClipLoss(chunk=chunk)(i, t, s)
    assert torch.allclose(full, ch, atol=1e-12)
    for a, b in zip(grads(full, i, t, s), grads(ClipLoss(chunk=chunk)(i, t, s), i, t, s)):
        assert torch.allclose(a, b, atol=1e-12)


def test_chunked_rows_subset_targets():
    # local form: 3 rows against 7 columns with offset targets, as a rank sees it
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    tg = torch.tensor([3, 4, 5])
    torch.autograd.gradcheck(lambda a, b, s: cross_entropy_rows(a, b, tg, s, chunk=2), (a, b, s))
    assert torch.allclose(cross_entropy_rows(a, b, tg, s, 2), cross_entropy_rows(a, b, tg, s, 0))


def test_local_form_rows_sum_to_full():
    """Splitting the batch into two 'ranks' by hand: the mean of their local losses is the full loss."""
    i, t, s = feats(8, 5, seed=4)
    full = ClipLoss(local_loss=False)(i, t, s)
    n = 4
    parts = []
    for r in range(2):
        tg = torch.arange(n) + r * n
        parts.append(0.5 * (cross_entropy_rows(i[r * n:(r + 1) * n], t, tg, s)
                            + cross_entropy_rows(t[r * n:(r + 1) * n], i, tg, s)))
    assert torch.allclose(full, (parts[0] + parts[1]) / 2, atol=1e-12)


def hand_siglip(i, t, s, b):
    n = i.shape[0]
    total = 0.0
    for a in range(n):
        for c in range(n):
            z = s[0] * (i[a] @ t[c]) + b[0]
            y = 1.0 if a == c else -1.0
            total = total + math.log(1 + math.exp(-y * z.item()))
    return total / n


@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_siglip_matches_hand_computation(chunk):
    i, t, s = feats(5, 4, seed=5)
    b = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    loss = SigLipLoss(chunk=chunk)(i, t, s, b)
    assert loss.item() == pytest.approx(hand_siglip(i, t, s, b), abs=1e-10)
    ref = SigLipLoss()(i, t, s, b)
    for x, y in zip(grads(loss, i, t, s, b), grads(ref, i, t, s, b)):
        assert torch.allclose(x, y, atol=1e-12)
