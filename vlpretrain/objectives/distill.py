"""Distillation from a frozen teacher beside CLIP's contrastive loss, as open_clip's `--distill-model` trains:
the student's image-to-text and text-to-image logits learn the teacher's softmax (a soft cross-entropy).

The teacher is any model `vlpretrain.models.load_model` reads (an open_clip architecture with local weights, or
an export of ours). It runs without autograd, once per micro-batch: under exact accumulation its features are
cached with the student's and never recomputed. It is a plain module on every rank, outside the engine, so it
works beside any ZeRO stage and MoE students.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlpretrain.config import REQUIRED, RunConfig, option
from vlpretrain.errors import ConfigError
from vlpretrain.loss import ClipLoss, gather_features
from vlpretrain.objectives.registry import Objective, Outputs, register


@dataclass
class DistillOptions:
    """The teacher and the weight of its term (open_clip's default: 1)."""

    teacher: str = option(REQUIRED, "teacher: an export of ours (.safetensors), or an open_clip architecture name "
                                    "with teacher_pretrained")
    teacher_pretrained: str | None = option(None, "local checkpoint of an open_clip teacher architecture")
    weight: float = option(1.0, "weight of the distillation term")

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"train.objective_options.weight: must be >= 0, got {self.weight}")


def soft_cross_entropy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of the cross-entropy of the student's softmax against the teacher's."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


@register("distill")
class Distill(Objective):
    """Terms `contrastive` (CLIP's) and `distill`, both batch terms: each rank's rows against the columns of the
    whole batch, so the mean over ranks (and exact micro-batches) is the loss of the global batch."""

    pooled = ("image_features", "text_features", "logit_scale",
              "teacher_image_features", "teacher_text_features", "teacher_logit_scale")
    Options = DistillOptions

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.loss = ClipLoss(rank, world_size, cfg.train.local_loss, cfg.train.loss_chunk)
        self.teacher: nn.Module | None = None

    def check_model(self, model: nn.Module) -> None:
        """Load the teacher and check it reads the student's inputs: the same image size and normalisation (one
        preprocessing feeds both) and the same vocabulary."""
        from vlpretrain.models import image_size, load_model

        super().check_model(model)
        o = self.options
        teacher = load_model(o.teacher, o.teacher_pretrained).eval().requires_grad_(False)
        student_size = self.cfg.data.image_size or image_size(model)
        if image_size(teacher) != student_size:
            raise ConfigError(f"train.objective_options.teacher: {o.teacher} reads {image_size(teacher)} px images, "
                              f"the student {student_size} px; both see the same batch, so they must match")
        from vlpretrain.models.openclip import open_clip

        t_pp, s_pp = open_clip.get_model_preprocess_cfg(teacher), open_clip.get_model_preprocess_cfg(model)
        if tuple(t_pp["mean"]) != tuple(s_pp["mean"]) or tuple(t_pp["std"]) != tuple(s_pp["std"]):
            raise ConfigError(f"train.objective_options.teacher: {o.teacher} normalises images with mean/std "
                              f"{t_pp['mean']}/{t_pp['std']}, the student with {s_pp['mean']}/{s_pp['std']}")
        if getattr(teacher, "vocab_size", None) != getattr(model, "vocab_size", None):
            raise ConfigError(f"train.objective_options.teacher: {o.teacher} has another vocabulary "
                              f"({getattr(teacher, 'vocab_size', '?')} tokens) than the student")
        self.teacher = teacher

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Put the teacher where the student's inputs are."""
        assert self.teacher is not None, "check_model() first"
        self.teacher.to(device=device, dtype=dtype)

    @torch.no_grad()
    def targets(self, images: Tensor, texts: Tensor) -> Outputs:
        assert self.teacher is not None, "check_model() first"
        t = self.teacher
        texts = fit_context(texts, t.context_length)
        return {"teacher_image_features": t.encode_image(images, normalize=True).float(),
                "teacher_text_features": t.encode_text(texts, normalize=True).float(),
                "teacher_logit_scale": t.logit_scale.exp().float().reshape(1)}

    def batch_terms(self, out: Outputs) -> dict[str, Tensor]:
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        contrastive = self.loss(image, text, scale)
        t_image, t_text = out["teacher_image_features"], out["teacher_text_features"]
        t_scale = out["teacher_logit_scale"].reshape(())
        scale = scale.reshape(())
        # this rank's rows against every rank's columns, for the student and the teacher alike
        all_text, all_image = gather_features(text, self.world_size), gather_features(image, self.world_size)
        t_all_text, t_all_image = gather_features(t_text, self.world_size), gather_features(t_image, self.world_size)
        distill = 0.5 * (soft_cross_entropy(t_scale * t_image @ t_all_text.T, scale * image @ all_text.T)
                         + soft_cross_entropy(t_scale * t_text @ t_all_image.T, scale * text @ all_image.T))
        return {"contrastive": contrastive, "distill": self.options.weight * distill}


def fit_context(tokens: Tensor, length: int) -> Tensor:
    """Token ids padded or cut to `length`; a cut row keeps its end-of-text token (the highest id, which
    open_clip's text towers pool at) in the last place."""
    n = tokens.shape[1]
    if n == length:
        return tokens
    if n < length:
        return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], length - n)], dim=1)
    eot = tokens.max()
    cut = tokens[:, :length].clone()
    lost = (tokens[:, length:] == eot).any(dim=1)
    cut[lost, -1] = eot
    return cut
