"""CLIP's objective: symmetric InfoNCE over the global batch (`vlpretrain.loss.ClipLoss`)."""

from __future__ import annotations

from torch import Tensor

from vlpretrain.config import RunConfig
from vlpretrain.loss import ClipLoss
from vlpretrain.objectives.registry import Objective, Outputs, register


@register("clip")
class Clip(Objective):
    """One term, `contrastive`: InfoNCE of the pooled image and text features at the learnt temperature."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.loss = ClipLoss(rank, world_size, cfg.train.local_loss, cfg.train.loss_chunk)

    def batch_terms(self, out: Outputs) -> dict[str, Tensor]:
        return {"contrastive": self.loss(out["image_features"], out["text_features"], out["logit_scale"])}
