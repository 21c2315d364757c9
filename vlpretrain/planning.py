"""Figures to plan a run before launching it: FLOPs per training sample and the size of an epoch (pure functions of
a model, a config and plain numbers). Model-state memory per ZeRO stage is `vlpretrain.engine.memory`'s, since it
follows DeepSpeed's accounting.

FLOPs are counted, not estimated: torch's `FlopCounterMode` records every matmul and convolution of a forward of
both towers at the run's image size, context length and patch dropout, then of the backward that training runs (the
gradient of the features, with locked towers skipping what they skip). The count runs on meta tensors, so it costs
no memory and no compute and leaves the model untouched. Model FLOPs follow the MFU convention: forward + backward of
the model, without the contrastive loss (a few B x B logits), exact accumulation's extra no-grad forward or
activation checkpointing's recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from vlpretrain.config import DataConfig
from vlpretrain.data.loader import count_shards_of
from vlpretrain.data.plan import plan_epoch, plan_resampled
from vlpretrain.models.patch_dropout import set_patch_dropout

# Samples counted at once: BatchNorm refuses one sample in training mode; every FLOP here scales with the batch.
_COUNT_BATCH = 2


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs of one training sample (an image and its caption) through both towers."""

    forward: int
    backward: int  # with the configured locked towers
    backward_unlocked: int  # the same model with every parameter trainable

    @property
    def train(self) -> int:
        """Model FLOPs of a training sample (forward + backward), the MFU convention."""
        return self.forward + self.backward

    @property
    def locked_saving(self) -> int:
        """Backward FLOPs that locked towers (LiT) skip."""
        return self.backward_unlocked - self.backward


def _forward_backward_flops(model: nn.Module, state: dict[str, torch.Tensor],
                            inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """FLOPs of a forward of `model` with `state` as its tensors, and of the backward of its outputs."""
    with FlopCounterMode(display=False) as counter:
        out = functional_call(model, state, inputs)
    forward = counter.get_total_flops()
    # the outputs a loss reads: pooled features of both towers, and a CoCa decoder's token logits
    features = [out[k] for k in ("image_features", "text_features", "logits") if k in out and out[k].requires_grad]
    if not features:  # both towers locked: no backward at all
        return forward, 0
    with FlopCounterMode(display=False) as counter:
        torch.autograd.backward([f.sum() for f in features])
    return forward, counter.get_total_flops()


def flops_per_sample(model: nn.Module, image_size: int, context_length: int,
                     patch_dropout: float | None = None) -> SampleFlops:
    """Count one training sample's FLOPs in `model` (training mode: its patch dropout applies, or `patch_dropout`
    for this count). The model itself is not run: the count uses meta tensors of its parameters' shapes, or, for
    layers with no meta kernels (MoE routing), a zero batch through detached views of the weights."""
    prob = getattr(getattr(getattr(model, "visual", None), "patch_dropout", None), "prob", None)
    was_training = model.training
    # activation checkpointing recomputes forwards inside the backward: not model FLOPs
    checkpointed = [m for m in model.modules() if getattr(m, "grad_checkpointing", False) is True]
    for m in checkpointed:
        m.grad_checkpointing = False
    model.train()
    if patch_dropout is not None:
        set_patch_dropout(model, patch_dropout)
    try:
        try:
            counts = _count(model, image_size, context_length, torch.device("meta"))
        except (RuntimeError, NotImplementedError):  # data-dependent ops (MoE capacity) need real values
            with torch.random.fork_rng():
                counts = _count(model, image_size, context_length, torch.device("cpu"))
    finally:
        model.train(was_training)
        for m in checkpointed:
            m.grad_checkpointing = True
        if prob is not None:
            set_patch_dropout(model, prob)
    (forward, backward), (_, unlocked) = counts
    return SampleFlops(forward // _COUNT_BATCH, backward // _COUNT_BATCH, unlocked // _COUNT_BATCH)


def _count(model: nn.Module, image_size: int, context_length: int,
           device: torch.device) -> list[tuple[int, int]]:
    """(forward, backward) FLOPs of `_COUNT_BATCH` samples as configured, then with every parameter trainable."""
    meta = device.type == "meta"
    buffers = {k: torch.empty_like(v, device=device) if meta else v.detach().clone()
               for k, v in model.named_buffers()}
    images = torch.zeros(_COUNT_BATCH, 3, image_size, image_size, device=device)
    texts = torch.zeros(_COUNT_BATCH, context_length, dtype=torch.long, device=device)
    counts = []
    for all_trainable in (False, True):
        state = {k: (torch.empty_like(p, device=device) if meta else p.detach()).requires_grad_(
                     p.requires_grad or all_trainable) for k, p in model.named_parameters()}
        counts.append(_forward_backward_flops(model, {**state, **buffers}, (images, texts)))
    return counts


@dataclass(frozen=True)
class EpochSize:
    """One epoch of the configured data: batches per rank, optimizer steps, samples over all ranks."""

    batches_per_rank: int
    steps: float  # batches per rank / micro-steps per optimizer step (a step may span two epochs)
    samples: int
    counted_from: str  # where the sample count came from


def epoch_size(data: DataConfig, world_size: int, grad_accum: int) -> EpochSize:
    """The epoch the loader will plan: resampled mode from `data.train_num_samples`; epoch mode from the shards'
    sample counts as training finds them (sidecars first, `counts.count_shards`), epoch 0's deal of shards to ranks
    and workers. Raises the loader's DataError / ConfigError when the shards are missing or too few."""
    workers = max(1, data.workers)
    if data.mode == "resampled":
        assert data.train_num_samples is not None
        plan = plan_resampled(data.train_num_samples, world_size=world_size, workers=workers,
                              batch_size=data.batch_size)
        source = "data.train_num_samples"
    else:
        counts = count_shards_of(data)
        plan = plan_epoch(counts.samples, seed=data.seed, epoch=0, rank=0, world_size=world_size,
                          workers=workers, batch_size=data.batch_size)
        source = f"sample counts of {len(counts.urls)} shards ({', '.join(sorted(counts.how))}), epoch 0"
    return EpochSize(plan.batches, plan.batches / grad_accum, plan.batches * data.batch_size * world_size, source)
