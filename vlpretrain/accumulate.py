"""Gradient accumulation for contrastive losses: exact over all micro-batches (the default), or independent.

A contrastive loss is not a sum over samples: each sample's negatives are the other samples of its batch, so k
micro-batch losses computed on their own are not the loss of one batch of k x b. `ExactAccumulation` computes the
loss of the whole batch with the memory of one micro-batch plus its features (GradCache, Gao et al. 2021; open_clip's
`--accum-freq`):

1. a forward of each micro-batch without autograd, keeping its features and the RNG state it started from;
2. the loss over the features of all k micro-batches (gathered across ranks by the loss, as always) and its
   gradient with respect to those features, the temperature and the bias;
3. a forward with autograd of each micro-batch, replaying its RNG state so that dropout, patch dropout and router
   jitter draw the same values, and a backward of the surrogate sum(features * cached gradient), whose gradient
   with respect to the parameters is exactly the loss's.

It costs one extra forward per micro-batch. `IndependentMicroBatches` is the plain scheme: one loss per micro-batch,
DeepSpeed averaging their gradients (negatives come from one micro-batch x world size only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from vlpretrain.config import RunConfig, TrainConfig

if TYPE_CHECKING:
    from vlpretrain.engine import Engine

MicroBatch = tuple[Tensor, Tensor]  # images, token ids, as the data source gives them (on the host)
Normalize = Callable[[Tensor, torch.dtype], Tensor]  # the data source's normalize: device batch -> model input


class Outputs(NamedTuple):
    """A forward's outputs in fp32: features of both towers, the temperature exp(logit_scale), the bias if any."""

    image: Tensor
    text: Tensor
    scale: Tensor
    bias: Tensor | None


def outputs(out: Sequence[Tensor]) -> Outputs:
    """The model's output tuple (open_clip's order) as fp32 `Outputs`; the loss runs in fp32 whatever the precision."""
    bias = out[3].float() if len(out) > 3 and out[3] is not None else None
    return Outputs(out[0].float(), out[1].float(), out[2].float(), bias)


def moe_terms(model: nn.Module, moe: bool) -> tuple[Tensor | float, dict[str, Tensor]]:
    """The weighted MoE auxiliary loss of the latest forward and its routing statistics as device scalars (0 and
    {} when dense)."""
    if not moe:
        return 0.0, {}
    from vlpretrain.models.moe import moe_losses

    return moe_losses(model, on_host=False)


class Accumulation(Protocol):
    """How the loop turns micro-batches into gradients: `loss` of a group of `micro_batches`, then `backward`."""

    micro_batches: int

    def loss(self, batches: list[MicroBatch]) -> tuple[Tensor, dict[str, Tensor]]:
        """The (detached) training loss of these micro-batches and metrics worth logging, all on the device (the
        loop copies them to the host on logging steps only)."""
        ...

    def backward(self) -> bool:
        """Backward and engine step for the last `loss`; True when an optimizer step was taken."""
        ...


class _DeviceForward:
    """A forward that brings its micro-batch to the engine's device, precision and memory layout."""

    def __init__(self, device: torch.device, dtype: torch.dtype, normalize: Normalize | None = None,
                 channels_last: bool = False):
        self.device, self.dtype = device, dtype
        self.normalize = normalize or (lambda images, dtype: images.to(dtype))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, engine: Engine, batch: MicroBatch) -> Outputs:
        images, texts = batch
        # uint8 pixel batches are normalised here, on the device (see BatchSource.normalize); on a GPU they are
        # already there (vlpretrain.data.prefetch), and `.to` is then a no-op
        images = self.normalize(images.to(self.device, non_blocking=True), self.dtype)
        images = images.contiguous(memory_format=self.memory_format)
        return outputs(engine(images, texts.to(self.device, non_blocking=True)))


class IndependentMicroBatches:
    """One micro-batch at a time: its own contrastive loss (+ MoE auxiliary loss), backward, engine step.

    DeepSpeed divides each loss by the accumulation steps, so the gradient is the mean of k micro-batch losses.
    """

    micro_batches = 1

    def __init__(self, engine: Engine, loss_fn: nn.Module, moe: bool, device: torch.device,
                 dtype: torch.dtype = torch.float32, normalize: Normalize | None = None, channels_last: bool = False):
        self.engine, self.loss_fn, self.moe = engine, loss_fn, moe
        self.forward = _DeviceForward(device, dtype, normalize, channels_last)
        self._loss: Tensor | None = None

    def loss(self, batches: list[MicroBatch]) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward with autograd of the one micro-batch and its loss."""
        (batch,) = batches
        out = self.forward(self.engine, batch)
        aux, stats = moe_terms(self.engine.module, self.moe)
        self._loss = self.loss_fn(*out) + aux
        return self._loss.detach(), {"logit_scale": out.scale.detach().reshape(-1)[0], **stats}

    def backward(self) -> bool:
        """Backward and engine step; an optimizer step only at the accumulation boundary."""
        assert self._loss is not None, "loss() first"
        boundary = self.engine.at_boundary
        self.engine.backward(self._loss)
        self.engine.step()
        self._loss = None
        return boundary


RngState = tuple[Tensor, Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The generators a forward may draw from: the CPU one (open_clip's patch dropout) and the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: RngState, device: torch.device) -> None:
    """Restore what `rng_state` returned."""
    cpu, accelerator = state
    torch.set_rng_state(cpu)
    if accelerator is not None:
        torch.cuda.set_rng_state(accelerator, device)


@dataclass
class _Pending:
    """What `backward` needs from `loss`: the graph of the loss over cached features, and how to replay."""

    loss: Tensor
    leaves: list[Tensor]  # image features, text features, temperature[, bias]: what the loss is differentiated by
    batches: list[MicroBatch]
    rngs: list[RngState]


class ExactAccumulation:
    """k micro-batches as one contrastive batch of k x b per rank (see the module docstring)."""

    def __init__(self, engine: Engine, loss_fn: nn.Module, micro_batches: int, moe: bool, device: torch.device,
                 dtype: torch.dtype = torch.float32, normalize: Normalize | None = None, channels_last: bool = False):
        self.engine, self.loss_fn, self.micro_batches, self.moe = engine, loss_fn, micro_batches, moe
        self.forward = _DeviceForward(device, dtype, normalize, channels_last)
        self._pending: _Pending | None = None

    def loss(self, batches: list[MicroBatch]) -> tuple[Tensor, dict[str, Tensor]]:
        """Features of every micro-batch without autograd, then the loss over all of them (with autograd from the
        features on). The logged loss adds the mean MoE auxiliary loss, as independent micro-batches would."""
        assert len(batches) == self.micro_batches, (len(batches), self.micro_batches)
        feats, rngs, aux, stats = [], [], 0.0, {}
        with torch.no_grad():
            for batch in batches:
                rngs.append(rng_state(self.forward.device))
                feats.append(self.forward(self.engine, batch))
                term, stats = moe_terms(self.engine.module, self.moe)
                aux = aux + term
        image = torch.cat([f.image for f in feats]).requires_grad_()
        text = torch.cat([f.text for f in feats]).requires_grad_()
        # the temperature and bias are parameters, the same in every micro-batch's forward
        scale = feats[0].scale.clone().requires_grad_()
        bias = feats[0].bias.clone().requires_grad_() if feats[0].bias is not None else None
        leaves = [image, text, scale] + ([bias] if bias is not None else [])
        with torch.enable_grad():
            loss = self.loss_fn(image, text, scale, bias)
        self._pending = _Pending(loss, leaves, list(batches), rngs)
        logged = loss.detach() + aux / self.micro_batches
        return logged, {"logit_scale": scale.detach().reshape(-1)[0], **stats}

    def backward(self) -> bool:
        """Feature gradients of the cached loss, then each micro-batch replayed with autograd and its surrogate
        backpropagated; the k-th engine step is the optimizer step."""
        p = self._pending
        assert p is not None, "loss() first"
        self._pending = None
        grads = torch.autograd.grad(p.loss, p.leaves, allow_unused=True)  # CLIP ignores the bias
        sizes = [images.shape[0] for images, _ in p.batches]
        g_image, g_text = grads[0].split(sizes), grads[1].split(sizes)
        for j, batch in enumerate(p.batches):
            set_rng_state(p.rngs[j], self.forward.device)
            out = self.forward(self.engine, batch)
            surrogate = (out.image * g_image[j]).sum() + (out.text * g_text[j]).sum()
            if j == 0:  # one parameter seen by every forward: its gradient is added once
                for g, value in zip(grads[2:], (out.scale, out.bias)):
                    if g is not None:
                        surrogate = surrogate + (value * g).sum()
            aux, _ = moe_terms(self.engine.module, self.moe)
            # each micro-batch's auxiliary loss once, averaged over the k (its scale as in independent mode)
            surrogate = surrogate + aux / self.micro_batches
            # the surrogate carries the exact gradient: DeepSpeed must not divide it by the accumulation steps
            self.engine.backward(surrogate, average_micro_steps=False)
            self.engine.step()
        return True


def build_accumulation(engine: Engine, loss_fn: nn.Module, cfg: RunConfig, device: torch.device,
                       normalize: Normalize | None = None, channels_last: bool = False) -> Accumulation:
    """The `train.accumulation` scheme; with one micro-step both are one plain forward and backward.
    `channels_last` feeds the image tower NHWC images (a convolutional tower on a GPU)."""
    moe = cfg.model.moe.num_experts > 0
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if cfg.train.accumulation == "exact" and cfg.train.grad_accum > 1:
        return ExactAccumulation(engine, loss_fn, cfg.train.grad_accum, moe, device, dtype, normalize, channels_last)
    return IndependentMicroBatches(engine, loss_fn, moe, device, dtype, normalize, channels_last)


def contrastive_batch(train: TrainConfig, batch_size: int, world_size: int) -> dict[str, Any]:
    """Samples per optimizer step, and how many samples each loss term sees (the positive and its negatives)."""
    per_step = batch_size * train.grad_accum * world_size
    exact = train.accumulation == "exact" or train.grad_accum == 1
    return {"samples per optimizer step": per_step,
            "contrastive batch": per_step if exact else batch_size * world_size}
