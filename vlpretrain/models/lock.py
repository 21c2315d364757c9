"""Locked towers (LiT, Zhai et al. 2022): a tower, usually a pretrained image tower, kept as it is while the other
learns.

A locked parameter gets requires_grad=False, so it has no gradient, the engine's parameter groups leave it out (no
optimizer state) and it stays bit-identical through training. The last N blocks of a locked tower, with what follows
them (final norm, pooling, projection), may stay trainable. BatchNorm layers of the locked part keep their running
statistics too: they normalise with them in training forwards, as in evaluation (open_clip's freeze_bn_stats).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from vlpretrain.config import ModelConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models.hf_text import hf_layers, hf_text_tower

Part = nn.Module | nn.Parameter
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class TowerParts:
    """A tower as locking sees it: everything it owns, its residual blocks (input to output) and its head."""

    whole: list[Part]
    blocks: Sequence[nn.Module]
    head: list[Part]  # what follows the last block: final norm, pooling, projection


def _present(owner: nn.Module, names: tuple[str, ...]) -> list[Part]:
    return [getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), nn.Module | nn.Parameter)]


def image_parts(model: nn.Module) -> TowerParts:
    """open_clip's VisionTransformer or ModifiedResNet (other towers lock whole, with no blocks to unlock)."""
    visual = model.visual
    if hasattr(visual, "transformer"):
        return TowerParts([visual], list(visual.transformer.resblocks), _present(visual, ("ln_post", "attn_pool", "proj")))
    if hasattr(visual, "layer4"):
        blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(visual, name)]
        return TowerParts([visual], blocks, _present(visual, ("attnpool",)))
    return TowerParts([visual], [], [])


def text_parts(model: nn.Module) -> TowerParts:
    """The text tower: `model.text` (CustomTextCLIP) or the text attributes of a plain CLIP."""
    text = getattr(model, "text", model)
    if hf_text_tower(model) is not None:  # its embeddings and layers, then open_clip's pooler and projection
        return TowerParts([text], hf_layers(text), _present(text, ("pooler", "proj")))
    whole = [text] if text is not model else _present(model, ("token_embedding", "positional_embedding", "cls_emb",
                                                                "transformer", "ln_final", "text_projection"))
    blocks = list(getattr(getattr(text, "transformer", None), "resblocks", []))
    return TowerParts(whole, blocks, _present(text, ("ln_final", "text_projection")))


TOWER_PARTS: dict[str, Callable[[nn.Module], TowerParts]] = {"image": image_parts, "text": text_parts}


def _parameters(parts: list[Part]) -> Iterator[nn.Parameter]:
    for part in parts:
        yield from [part] if isinstance(part, nn.Parameter) else part.parameters()


def _running_statistics(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: this BatchNorm normalises with its running statistics and never updates them."""
    module.training = False


def lock_tower(model: nn.Module, tower: str, unlocked_blocks: int = 0, freeze_bn: bool = True) -> None:
    """Freeze `tower` ("image" or "text") of `model` except its last `unlocked_blocks` blocks and their head."""
    parts = TOWER_PARTS[tower](model)
    if unlocked_blocks > len(parts.blocks):
        raise ConfigError(f"model.lock_{tower}_unlocked_blocks: the {tower} tower "
                          f"({type(parts.whole[0]).__name__}) has {len(parts.blocks)} blocks that can be unlocked, "
                          f"got {unlocked_blocks}")
    unlocked = [*parts.blocks[len(parts.blocks) - unlocked_blocks:], *parts.head] if unlocked_blocks else []
    for p in _parameters(parts.whole):
        p.requires_grad_(False)
    for p in _parameters(unlocked):
        p.requires_grad_(True)
    if freeze_bn:
        trainable = {id(m) for part in unlocked if isinstance(part, nn.Module) for m in part.modules()}
        for part in parts.whole:
            for m in part.modules() if isinstance(part, nn.Module) else ():
                if isinstance(m, BATCH_NORMS) and id(m) not in trainable:
                    m.register_forward_pre_hook(_running_statistics)


def lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply `model.lock_image` / `model.lock_text` of the config."""
    if cfg.lock_image:
        lock_tower(model, "image", cfg.lock_image_unlocked_blocks, cfg.lock_image_freeze_bn)
    if cfg.lock_text:
        lock_tower(model, "text", cfg.lock_text_unlocked_blocks)
