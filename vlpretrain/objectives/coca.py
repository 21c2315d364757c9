"""CoCa's objective (Yu et al. 2022): CLIP's contrastive loss plus captioning, the text decoder predicting each
caption token from the image and the tokens before it (teacher forcing), as open_clip trains it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.config import RunConfig, need, option
from vlpretrain.errors import ConfigError
from vlpretrain.loss import ClipLoss
from vlpretrain.objectives.registry import Objective, Outputs, register


@dataclass
class CocaOptions:
    """Weights of the two terms (open_clip's defaults: 1 and 2) and the padding token the caption loss skips."""

    contrastive_weight: float = option(1.0, "weight of the contrastive term")
    caption_weight: float = option(2.0, "weight of the captioning term")
    pad_id: int | None = option(None, "token id of padding, left out of the captioning loss (default: the model's, "
                                      "its text_cfg.pad_id: 0 with open_clip's tokenizer)")

    def validate(self) -> None:
        for key in ("contrastive_weight", "caption_weight"):
            need(getattr(self, key) >= 0, f"train.objective_options.{key}", f"must be >= 0, got {getattr(self, key)}")


@register("coca")
class CoCa(Objective):
    """Terms `contrastive` (a batch term: exact over micro-batches) and `caption` (a sample term: the mean
    token cross-entropy of a micro-batch, averaged over the micro-batches)."""

    Options = CocaOptions

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.loss = ClipLoss(rank, world_size, cfg.train.local_loss, cfg.train.loss_chunk)
        self.pad_id = 0 if self.options.pad_id is None else self.options.pad_id

    def check_model(self, model: nn.Module) -> None:
        if not hasattr(model, "text_decoder"):
            raise ConfigError(f"train.objective: coca needs a CoCa architecture with a text decoder; model.name "
                              f"{self.cfg.model.name} has none (try tiny-coca or coca_ViT-B-32)")
        if self.options.pad_id is None:
            # a tokenizer of ours pads with its own id (1 for vlpretrain.tokenizer's), which the model config states
            self.pad_id = int(getattr(model.text, "pad_id", getattr(model, "pad_id", 0)))

    def batch_terms(self, out: Outputs) -> dict[str, Tensor]:
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        return {"contrastive": self.options.contrastive_weight * loss}

    def sample_terms(self, out: Outputs) -> dict[str, Tensor]:
        logits, labels = out["logits"], out["labels"]
        # over flattened tokens, not logits permuted to [B, V, T]: a softmax over a strided dim is ~5x slower on CPU
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.pad_id)
        return {"caption": self.options.caption_weight * loss}
