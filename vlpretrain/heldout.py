"""Validation on held-out shards (`data.val`) during training: contrastive loss and retrieval recall both ways.

Every rank encodes its share of the validation samples through the live engine (so it works under every ZeRO
stage, ZeRO-3's partitioned weights included, and no rank waits while another evaluates alone); the loss is the
training loss over the global validation batch, and rank 0 ranks all gathered features with
`vlpretrain.retrieval.retrieval_metrics` (as zeroshot's retrieval benchmarks do). Each sample contributes one image
and the caption the loader picked for it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from vlpretrain.accumulate import Forward
from vlpretrain.config import RunConfig
from vlpretrain.engine import DistEnv, Engine
from vlpretrain.objectives import Objective, total
from vlpretrain.retrieval import retrieval_metrics
from vlpretrain.stopping import StopCheck, check_stop


class Validator:
    """`run(engine)` -> {"val": metrics} on rank 0 ({} elsewhere); built before training so bad paths fail early."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, env: DistEnv, objective: Objective):
        from vlpretrain.data import build_loader
        from vlpretrain.models import get_tokenizer, image_transform

        self.cfg, self.env, self.objective = cfg, env, objective
        # fast_decode off: evaluation keeps open_clip's preprocessing pixel for pixel (PIL resampling)
        data = replace(cfg.data, train=cfg.data.val, mode="epoch", weights=None, train_num_samples=None,
                       augment=False, shuffle_buffer=0, fast_decode=False)
        self.loader = build_loader(data, image_transform(model, train=False), get_tokenizer(cfg.model),
                                   rank=env.rank, world_size=env.world_size)
        per_batch = cfg.data.batch_size * env.world_size
        # every rank runs the same number of batches, so the collectives below line up
        self.batches = max(1, min(self.loader.batches_per_epoch, math.ceil(cfg.eval.val_samples / per_batch)))

    @torch.no_grad()
    def run(self, engine: Engine, should_stop: StopCheck | None = None) -> dict[str, dict[str, float]]:
        """Validation metrics; `should_stop`, asked before each batch on every rank (so it must answer alike on
        all, as `DistEnv.any` does), raises `vlpretrain.stopping.Interrupted` there."""
        module, dtype = engine.module, torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        forward = Forward(engine, dtype)
        was_training = module.training
        module.eval()
        images_f, texts_f, losses = [], [], []
        try:
            self.loader.set_epoch(0)
            for i, (images, texts) in enumerate(self.loader):
                if i >= self.batches:
                    break
                check_stop(should_stop)
                images, texts = images.to(self.env.device, dtype), texts.to(self.env.device)
                out = forward(images, texts)
                out.update(self.objective.targets(images, texts))
                # the objective's loss without the MoE auxiliary term, which is a regulariser, not a fit
                terms = {**self.objective.batch_terms(out), **self.objective.sample_terms(out)}
                losses.append(total(terms).detach())
                images_f.append(out["image_features"])
                texts_f.append(out["text_features"])
        finally:
            module.train(was_training)
        loss = torch.stack(losses).mean()
        image_all, text_all = _gather(torch.cat(images_f), self.env), _gather(torch.cat(texts_f), self.env)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= self.env.world_size
        if not self.env.is_main:
            return {}
        metrics = retrieval_metrics(image_all.cpu(), text_all.cpu(), torch.arange(len(text_all)))
        return {"val": {"loss": float(loss), **metrics}}


def _gather(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Rows of every rank, rank by rank (all ranks hold the same number)."""
    if env.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)
