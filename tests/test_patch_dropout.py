"""FLIP's masked patches: training forwards see fewer image tokens, evaluation sees all of them and is unaffected,
the last train.unmasked_steps train unmasked, towers without patches are refused."""

import json

import pytest
import torch
from helpers import run

from vlpretrain.config import ModelConfig, load_config
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model
from vlpretrain.models.patch_dropout import masked_fraction, set_patch_dropout

PATCHES = (28 // 7) ** 2  # tiny-vit: 28 px images, 7 px patches


def tokens_seen(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Tokens entering the first transformer block of the image tower (batch first: [B, L, D])."""
    seen = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model.encode_image(images)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_training_sees_fewer_patches_evaluation_sees_all(fraction):
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="tiny-vit"))
    torch.manual_seed(0)
    masked = build_model(ModelConfig(name="tiny-vit", patch_dropout=fraction))
    kept = max(1, int(PATCHES * (1 - fraction)))
    assert tokens_seen(masked.train(), images) == 1 + kept  # the class token always stays
    assert tokens_seen(plain.train(), images) == 1 + PATCHES
    assert tokens_seen(masked.eval(), images) == 1 + PATCHES
    with torch.no_grad():
        torch.testing.assert_close(masked.encode_image(images), plain.eval().encode_image(images), rtol=0, atol=0)
    set_patch_dropout(masked, 0.0)  # the unmasked phase
    assert tokens_seen(masked.train(), images) == 1 + PATCHES


def test_unmasked_phase_schedule():
    assert [masked_fraction(s, 5, 2, 0.5) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert [masked_fraction(s, 3, 0, 0.5) for s in range(3)] == [0.5, 0.5, 0.5]


def test_patch_dropout_config_errors():
    with pytest.raises(ConfigError, match=r"model.patch_dropout: the image tower \(ModifiedResNet\) has no patch"):
        build_model(ModelConfig(name="tiny-resnet", patch_dropout=0.5))
    with pytest.raises(ConfigError, match="model.patch_dropout: expected a fraction"):
        load_config(None, ["data.train=x", "model.patch_dropout=1.0"])
    with pytest.raises(ConfigError, match="train.unmasked_steps: has no effect without model.patch_dropout"):
        load_config(None, ["data.train=x", "train.unmasked_steps=3"])
    with pytest.raises(ConfigError, match=r"train.unmasked_steps: expected 0..10"):
        load_config(None, ["data.train=x", "train.steps=10", "train.warmup_steps=1", "model.patch_dropout=0.5",
                           "train.unmasked_steps=11"])


def test_trainer_masks_then_trains_unmasked(tmp_path):
    out = tmp_path / "flip"
    run(out, "train.steps=3", "train.warmup_steps=1", "model.patch_dropout=0.5", "train.unmasked_steps=1",
        "train.grad_accum=2")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["patch_dropout"] for r in rows if "loss" in r} == {1: 0.5, 2: 0.5, 3: 0.0}
