"""One optimizer step from its micro-batches: forward, loss terms, backward, engine steps.

An objective (`vlpretrain.objectives`) names two kinds of loss terms. Batch terms (contrastive ones) are not sums
over samples: each sample's negatives are the other samples of its batch, so k micro-batch losses computed on their
own are not the loss of one batch of k x b. `ExactAccumulation` computes them over the whole batch with the memory
of one micro-batch plus its pooled outputs (GradCache, Gao et al. 2021; open_clip's `--accum-freq`):

1. a forward of each micro-batch without autograd, keeping its pooled outputs (features, temperature; a teacher's
   features) and the RNG state it started from (sample terms are not computed here);
2. the batch terms over the pooled outputs of all k micro-batches (gathered across ranks by the loss, as always)
   and their gradient with respect to those outputs;
3. a forward with autograd of each micro-batch, replaying its RNG state so that dropout, patch dropout and router
   jitter draw the same values, and a backward of the surrogate sum(outputs * cached gradient), whose gradient
   with respect to the parameters is exactly the batch terms', plus the micro-batch's sample terms (captioning,
   the MoE auxiliary loss) divided by k: those accumulate as the mean of the micro-batches' terms.

It costs one extra forward per micro-batch. `IndependentMicroBatches` is the plain scheme: every term per
micro-batch, DeepSpeed averaging their gradients (negatives come from one micro-batch x world size only).

Both take one optimizer step's micro-batches, already on the device (`vlpretrain.data.prefetch`): each is
normalised once, here, and serves every forward of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from vlpretrain.config import RunConfig, TrainConfig
from vlpretrain.objectives import PER_FORWARD, Objective, Outputs, total

if TYPE_CHECKING:
    from vlpretrain.engine import Engine

MicroBatch = tuple[Tensor, Tensor]  # images, token ids, on the device as the data source gives them
Normalize = Callable[[Tensor, torch.dtype], Tensor]  # the data source's normalize: device batch -> model input
Observe = Callable[[Tensor], None]  # sees each loss before the optimizer step (vlpretrain.guard)


class Accumulation(Protocol):
    """How the loop turns one optimizer step's micro-batches into gradients and an engine step."""

    micro_batches: int

    def step(self, batches: list[MicroBatch], observe: Observe) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward, backward and engine steps of these micro-batches, `observe` called with each loss before the
        optimizer step; returns the (detached) loss and metrics worth logging (each loss term as `loss/NAME`, the
        temperature, routing statistics), all on the device: the loop reads them on logging steps only."""
        ...


class Forward:
    """The model's forward on a micro-batch: inputs prepared once, named outputs in fp32 (losses run in fp32
    whatever the training precision)."""

    def __init__(self, engine: Engine, dtype: torch.dtype = torch.float32, normalize: Normalize | None = None,
                 channels_last: bool = False):
        self.engine, self.dtype = engine, dtype
        self.normalize = normalize or (lambda images, dtype: images.to(dtype))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def inputs(self, batch: MicroBatch) -> MicroBatch:
        """Model inputs from a device batch: uint8 pixels normalised on the device (see BatchStream.normalize),
        in the image tower's memory layout."""
        images, texts = batch
        return self.normalize(images, self.dtype).contiguous(memory_format=self.memory_format), texts

    def __call__(self, images: Tensor, texts: Tensor) -> Outputs:
        out = self.engine(images, texts)
        return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in out.items()}


def logged(out: Outputs, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a step logs besides its loss: each term, the temperature, routing statistics (device scalars)."""
    values = {f"loss/{k}": v.detach().reshape(()) for k, v in terms.items()}
    values["logit_scale"] = out["logit_scale"].detach().reshape(-1)[0]
    values.update({k: v for k, v in out.items() if k.startswith("moe/")})
    return values


def _mean_terms(per_micro: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([t[k].detach().float().reshape(()) for t in per_micro]).mean() for k in per_micro[0]}


class IndependentMicroBatches:
    """Each micro-batch on its own: its loss (every term), backward, engine step. DeepSpeed divides each loss by
    the accumulation steps, so the gradient is the mean of the k micro-batch losses."""

    def __init__(self, engine: Engine, objective: Objective, micro_batches: int = 1, dtype: torch.dtype = torch.float32,
                 normalize: Normalize | None = None, channels_last: bool = False):
        self.engine, self.objective, self.micro_batches = engine, objective, micro_batches
        self.forward = Forward(engine, dtype, normalize, channels_last)

    def step(self, batches: list[MicroBatch], observe: Observe) -> tuple[Tensor, dict[str, Tensor]]:
        assert len(batches) == self.micro_batches, (len(batches), self.micro_batches)
        losses, per_micro, out = [], [], {}
        for batch in batches:
            images, texts = self.forward.inputs(batch)
            out = self.forward(images, texts)
            out.update(self.objective.targets(images, texts))
            terms = {**self.objective.batch_terms(out), **self.objective.micro_terms(out)}
            loss = total(terms)
            observe(loss.detach())
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            per_micro.append(terms)
        return torch.stack(losses).mean(), logged(out, _mean_terms(per_micro))


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
class _Pooled:
    """The pooled outputs of every micro-batch, concatenated, and which of them the loss differentiates."""

    values: Outputs
    leaves: list[str]  # pooled model outputs (a teacher's are constants)


def pool(parts: list[Outputs], names: tuple[str, ...], model_outputs: set[str]) -> _Pooled:
    """Concatenate per-sample outputs over micro-batches (one-per-forward values from the first); the model's own
    become leaves that require gradients."""
    values, leaves = {}, []
    for name in names:
        if name not in parts[0]:
            continue
        value = parts[0][name].clone() if name in PER_FORWARD else torch.cat([p[name] for p in parts])
        if name in model_outputs:
            value.requires_grad_()
            leaves.append(name)
        values[name] = value
    return _Pooled(values, leaves)


class ExactAccumulation:
    """k micro-batches as one batch of k x b per rank for the batch terms (see the module docstring)."""

    def __init__(self, engine: Engine, objective: Objective, micro_batches: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, normalize: Normalize | None = None, channels_last: bool = False):
        self.engine, self.objective, self.micro_batches, self.device = engine, objective, micro_batches, device
        self.forward = Forward(engine, dtype, normalize, channels_last)

    def step(self, batches: list[MicroBatch], observe: Observe) -> tuple[Tensor, dict[str, Tensor]]:
        assert len(batches) == self.micro_batches, (len(batches), self.micro_batches)
        k, obj = self.micro_batches, self.objective
        inputs = [self.forward.inputs(b) for b in batches]
        # 1. pooled outputs of every micro-batch, without autograd
        parts, rngs, names = [], [], set()
        with torch.no_grad():
            for images, texts in inputs:
                rngs.append(rng_state(self.device))
                out = self.forward(images, texts)
                names = set(out)
                parts.append({**{n: out[n] for n in obj.pooled if n in out}, **obj.targets(images, texts)})
        pooled = pool(parts, obj.pooled, names)
        # 2. the batch terms over the whole batch, and their gradient with respect to the pooled outputs
        with torch.enable_grad():
            batch_terms = obj.batch_terms(pooled.values)
            batch_loss = total(batch_terms)
        grads = dict(zip(pooled.leaves, torch.autograd.grad(batch_loss, [pooled.values[n] for n in pooled.leaves],
                                                            allow_unused=True)))
        sizes = [images.shape[0] for images, _ in inputs]
        split = {n: g.split(sizes) for n, g in grads.items() if g is not None and n not in PER_FORWARD}
        # 3. each micro-batch again, with autograd and its own randomness: the surrogate carries the exact gradient
        # of the batch terms; the sample terms (computed here only) add their mean
        micro_terms, loss = [], batch_loss.detach()
        for j, (images, texts) in enumerate(inputs):
            set_rng_state(rngs[j], self.device)
            out = self.forward(images, texts)
            surrogate = sum(((out[n] * g[j]).sum() for n, g in split.items()), torch.zeros((), device=self.device))
            if j == 0:  # a parameter seen by every forward: its gradient is added once
                for n, g in grads.items():
                    if n in PER_FORWARD and g is not None:
                        surrogate = surrogate + (out[n] * g).sum()
            terms = obj.micro_terms(out)
            micro_terms.append(terms)
            surrogate = surrogate + total(terms) / k
            # DeepSpeed must not divide it by the accumulation steps: it is already the step's gradient
            self.engine.backward(surrogate, average_micro_steps=False)
            if j == k - 1:  # the whole step's loss is known: the guard sees it before the optimizer step
                sample_terms = _mean_terms(micro_terms) if terms else {}
                loss = loss + total(sample_terms)
                observe(loss)
            self.engine.step()
        return loss, logged(out, {**batch_terms, **sample_terms})


def build_accumulation(engine: Engine, objective: Objective, cfg: RunConfig, device: torch.device,
                       normalize: Normalize | None = None, channels_last: bool = False) -> Accumulation:
    """The `train.accumulation` scheme over `train.grad_accum` micro-batches; with one micro-batch both are one
    plain forward and backward. `channels_last` feeds the image tower NHWC images (a convolutional tower on a GPU)."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    k = cfg.train.grad_accum
    if cfg.train.accumulation == "exact" and k > 1:
        return ExactAccumulation(engine, objective, k, device, dtype, normalize, channels_last)
    return IndependentMicroBatches(engine, objective, k, dtype, normalize, channels_last)


def contrastive_batch(train: TrainConfig, batch_size: int, world_size: int) -> dict[str, Any]:
    """Samples per optimizer step, and how many samples each loss term sees (the positive and its negatives)."""
    per_step = batch_size * train.grad_accum * world_size
    exact = train.accumulation == "exact" or train.grad_accum == 1
    return {"samples per optimizer step": per_step,
            "contrastive batch": per_step if exact else batch_size * world_size}
