"""Masked image patches (FLIP, Li et al. 2023): training forwards of a ViT image tower see a random subset of its
patch tokens, which makes each step cheaper by about the dropped fraction of the image tower's cost; evaluation sees
every patch. A run may end with unmasked steps (`train.unmasked_steps`), as FLIP's unmasked tuning does, to close
the gap between the masked training and the unmasked evaluation distributions.

open_clip's own `PatchDropout` module does the dropping (the class token is always kept); we only place it and
change its fraction.
"""

from __future__ import annotations

from torch import nn

from vlpretrain.errors import ConfigError
from vlpretrain.models.openclip import open_clip

PatchDropout = open_clip.transformer.PatchDropout


def enable_patch_dropout(model: nn.Module, fraction: float) -> None:
    """Drop `fraction` of the image patches in training forwards; a tower without patch tokens is refused."""
    visual = model.visual
    if not hasattr(visual, "patch_dropout"):
        raise ConfigError(f"model.patch_dropout: the image tower ({type(visual).__name__}) has no patch tokens to "
                          "drop; patch dropout needs a ViT image tower (set it to 0 for this model)")
    visual.patch_dropout = PatchDropout(fraction)


def set_patch_dropout(model: nn.Module, fraction: float) -> None:
    """Change the dropped fraction of a model built with patch dropout (0 sees every patch); others are left as
    they are."""
    module = getattr(getattr(model, "visual", None), "patch_dropout", None)
    if isinstance(module, PatchDropout):
        module.prob = fraction


def masked_fraction(step: int, steps: int, unmasked_steps: int, fraction: float) -> float:
    """The patch dropout of optimizer step `step` (0-based): `fraction`, then 0 for the last `unmasked_steps`."""
    return fraction if step < steps - unmasked_steps else 0.0
