"""SigLIP's objective: a sigmoid loss on every image-text pair (`vlpretrain.loss.SigLipLoss`)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from vlpretrain.config import RunConfig
from vlpretrain.loss import SigLipLoss
from vlpretrain.objectives.registry import Objective, Outputs, register


@register("siglip")
class SigLip(Objective):
    """One term, `contrastive`; the model gets a learnable logit bias, both started as in the SigLIP paper
    (temperature 10, bias -10)."""

    pooled = ("image_features", "text_features", "logit_scale", "logit_bias")

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.loss = SigLipLoss(rank, world_size, cfg.train.loss_chunk)

    @classmethod
    def model_options(cls, cfg: RunConfig) -> dict[str, Any]:
        return {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}

    def batch_terms(self, out: Outputs) -> dict[str, Tensor]:
        return {"contrastive": self.loss(out["image_features"], out["text_features"], out["logit_scale"],
                                         out["logit_bias"])}
