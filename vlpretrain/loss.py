"""Contrastive losses over the global batch: CLIP's InfoNCE and SigLIP's sigmoid loss.

Features are gathered from every rank with gradients, so each rank's backward carries its share of the full-batch
gradient; averaging gradients over ranks (as DeepSpeed does) then gives exactly the gradient of the loss over the
global batch. Rank and world size are passed in; nothing here reads a global trainer state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

MAX_LOGIT_SCALE = 100.0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, x, world_size):
        ctx.rows = x.shape[0]
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_single(mine, grad)
            return mine, None
        # gloo (the CPU backend) has no reduce-scatter: sum a copy of the whole gradient, keep this rank's rows
        grad = grad.clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_features(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order; gradients flow back to each rank's own rows."""
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x, world_size)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i CE(scale * a_i . B^T, target_i), computed over column chunks of B.

    Only the row log-sum-exp is kept between forward and backward; logits are recomputed chunk by chunk, so memory
    is O(rows x chunk) rather than O(rows x columns).
    """

    @staticmethod
    def forward(ctx, a, b, targets, scale, chunk):
        lse = torch.full((a.shape[0],), float("-inf"), dtype=a.dtype, device=a.device)
        for start in range(0, b.shape[0], chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(scale * (a @ b[start:start + chunk].T), dim=1))
        pos = scale * (a * b[targets]).sum(dim=1)
        ctx.save_for_backward(a, b, targets, scale, lse)
        ctx.chunk = chunk
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad):
        a, b, targets, scale, lse = ctx.saved_tensors
        n = a.shape[0]
        g = grad / n
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        dscale = torch.zeros((), dtype=a.dtype, device=a.device)
        for start in range(0, b.shape[0], ctx.chunk):
            bc = b[start:start + ctx.chunk]
            dots = a @ bc.T
            p = torch.exp(scale * dots - lse[:, None])  # softmax restricted to this chunk
            da += scale * (p @ bc)
            db[start:start + ctx.chunk] += scale * (p.T @ a)
            dscale += (p * dots).sum()
        bt = b[targets]
        da -= scale * bt
        db.index_add_(0, targets, -scale * a)
        dscale -= (a * bt).sum()
        return g * da, g * db, None, (g * dscale).reshape(scale.shape), None


def cross_entropy_rows(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                       chunk: int = 0) -> torch.Tensor:
    """Mean cross-entropy of rows of `scale * a @ b.T` against `targets`; chunked over columns when chunk > 0."""
    if chunk and chunk < b.shape[0]:
        return _ChunkedCrossEntropy.apply(a, b, targets, scale.reshape(()), chunk)
    return F.cross_entropy(scale.reshape(()) * a @ b.T, targets)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (CLIP).

    local_loss=True: this rank's rows against all columns (O(local x global) logits); its loss is this rank's
    share, and the mean over ranks equals the full-matrix loss. local_loss=False: every rank computes the full
    global matrix. Both give the same averaged gradients. `chunk` bounds logit memory to O(local x chunk).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = True, chunk: int = 0):
        super().__init__()
        self.rank, self.world_size, self.local_loss, self.chunk = rank, world_size, local_loss, chunk

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)
        all_images = gather_features(image_features, self.world_size)
        all_texts = gather_features(text_features, self.world_size)
        n = image_features.shape[0]
        if self.local_loss:
            targets = torch.arange(n, device=image_features.device) + self.rank * n
            rows_i, rows_t = image_features, text_features
        else:
            targets = torch.arange(all_images.shape[0], device=image_features.device)
            rows_i, rows_t = all_images, all_texts
        return 0.5 * (cross_entropy_rows(rows_i, all_texts, targets, scale, self.chunk)
                      + cross_entropy_rows(rows_t, all_images, targets, scale, self.chunk))


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): every image-text pair is a binary decision, positives on the global diagonal.

    Each rank scores its local images against all texts; the loss is normalised by the local batch size, as in the
    paper, so the mean over ranks is the global loss. `chunk` processes the text columns in pieces.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, chunk: int = 0):
        super().__init__()
        # always local: each rank owns its image rows, so there is no full-matrix form to choose
        self.rank, self.world_size, self.chunk = rank, world_size, chunk

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        assert logit_bias is not None, "the sigmoid loss needs the model's logit_bias"
        scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).reshape(())
        bias = logit_bias.reshape(())
        all_texts = gather_features(text_features, self.world_size)
        n = image_features.shape[0]
        offset = self.rank * n
        chunk = self.chunk if self.chunk and self.chunk < all_texts.shape[0] else all_texts.shape[0]
        rows = torch.arange(n, device=image_features.device)
        total = image_features.new_zeros(())
        for start in range(0, all_texts.shape[0], chunk):
            cols = all_texts[start:start + chunk]
            labels = -torch.ones(n, cols.shape[0], dtype=image_features.dtype, device=image_features.device)
            diag = rows + offset - start
            inside = (diag >= 0) & (diag < cols.shape[0])
            labels[rows[inside], diag[inside]] = 1.0
            if self.chunk:  # recompute this chunk's logits in backward instead of keeping them
                total = total + torch.utils.checkpoint.checkpoint(
                    _sigmoid_sum, image_features, cols, scale, bias, labels, use_reentrant=False)
            else:
                total = total + _sigmoid_sum(image_features, cols, scale, bias, labels)
        return total / n


def _sigmoid_sum(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(labels * (scale * images @ texts.T + bias)).sum()
