"""Locked towers (LiT): what is frozen, what stays trainable, BatchNorm statistics kept, no optimizer state, and
locked weights bit-identical through training under every ZeRO stage."""

from pathlib import Path

import pytest
import torch
from helpers import losses, run

from vlpretrain.config import ModelConfig, load_config
from vlpretrain.engine import param_groups
from vlpretrain.engine.checkpoint import safe_torch_load
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, count_parameters, export_model, load_state_dict


def trainable(model: torch.nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


def test_locked_image_tower_is_frozen_and_left_out_of_the_optimizer():
    model = build_model(ModelConfig(name="tiny-vit", lock_image=True))
    names = dict(model.named_parameters())
    assert trainable(model) == {k for k in names if not k.startswith("visual.")}
    assert "logit_scale" in trainable(model)  # the temperature still learns
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert grouped == {id(p) for k, p in names.items() if not k.startswith("visual.")}
    counts = count_parameters(model)
    assert counts["trainable"] == counts["total"] - counts["image tower"]


def test_unlocked_blocks_keep_the_last_blocks_and_the_head_trainable():
    model = build_model(ModelConfig(name="tiny-vit", lock_image=True, lock_image_unlocked_blocks=1,
                                    lock_text=True, lock_text_unlocked_blocks=2))
    last = len(model.visual.transformer.resblocks) - 1
    image = {k for k in trainable(model) if k.startswith("visual.")}
    assert image == {k for k, _ in model.named_parameters()
                     if k.startswith((f"visual.transformer.resblocks.{last}.", "visual.ln_post.", "visual.proj"))}
    text = trainable(model) - image - {"logit_scale"}
    # both text blocks and the head; the embeddings stay locked
    assert text == {k for k, _ in model.named_parameters()
                    if k.startswith(("transformer.resblocks.", "ln_final.", "text_projection"))}


def test_locked_resnet_keeps_batchnorm_statistics():
    model = build_model(ModelConfig(name="tiny-resnet", lock_image=True)).train()
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        train_out = model.encode_image(images)
        model.eval()
        eval_out = model.encode_image(images)
    after = model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running means, variances, counters
    torch.testing.assert_close(train_out, eval_out)  # normalised by the running statistics in training too
    unfrozen = build_model(ModelConfig(name="tiny-resnet", lock_image=True, lock_image_freeze_bn=False)).train()
    unfrozen.encode_image(images)
    assert not torch.equal(unfrozen.visual.bn1.running_mean, before["bn1.running_mean"])


def test_partly_unlocked_resnet_trains_its_last_bottleneck_and_attention_pool():
    model = build_model(ModelConfig(name="tiny-resnet", lock_image=True, lock_image_unlocked_blocks=1))
    image = {k for k in trainable(model) if k.startswith("visual.")}
    assert image == {k for k, _ in model.named_parameters() if k.startswith(("visual.layer4.0.", "visual.attnpool."))}


def test_lock_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.lock_image_unlocked_blocks: the image tower .* has 4 blocks"):
        build_model(ModelConfig(name="tiny-vit", lock_image=True, lock_image_unlocked_blocks=5))
    with pytest.raises(ConfigError, match="model.lock_text_unlocked_blocks: has no effect unless model.lock_text"):
        load_config(None, ["data.train=x", "model.lock_text_unlocked_blocks=1"])


def optimizer_state_numel(ckpt: Path) -> int:
    """Elements of every non-scalar tensor in the optimizer state DeepSpeed saved (moments, fp32 master copies)."""
    def numel(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() if x.ndim > 0 and x.is_floating_point() else 0
        if isinstance(x, dict):
            return sum(numel(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(numel(v) for v in x)
        return 0

    total = 0
    for f in sorted(ckpt.rglob("*.pt")):
        state = safe_torch_load(f, map_location="cpu")
        total += numel(state) if "optim_states" in f.name else numel(state.get("optimizer"))
    return total


def test_locked_image_tower_bit_identical_under_every_zero_stage(tmp_path):
    """A pretrained image tower stays bit-identical while the text tower learns (ZeRO 0-3, exact accumulation);
    the optimizer holds state for the trainable parameters only; all stages follow one trajectory."""
    torch.manual_seed(123)
    start = build_model(ModelConfig(name="tiny-vit"))
    export_model(start, ModelConfig(name="tiny-vit"), tmp_path / "start.safetensors")
    initial = load_state_dict(tmp_path / "start.safetensors")
    n_trainable = count_parameters(build_model(ModelConfig(name="tiny-vit", lock_image=True)))["trainable"]
    common = ["train.steps=2", "train.warmup_steps=1", "train.grad_accum=2", "model.lock_image=true",
              f"model.pretrained={tmp_path / 'start.safetensors'}"]
    traj = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path / f"z{stage}"
        run(out, *common, f"train.zero_stage={stage}")
        traj[stage] = losses(out)
        ckpt = out / "checkpoints" / "step_00000002"
        final = load_state_dict(ckpt / "model.safetensors")
        for k, v in initial.items():
            if k.startswith("visual."):
                assert torch.equal(final[k], v), (stage, k)
        assert not torch.equal(final["text_projection"], initial["text_projection"]), stage
        # ZeRO-0 keeps two Adam moments per trainable parameter; ZeRO 1-3 also an fp32 master copy
        copies = 2 if stage == 0 else 3
        held = optimizer_state_numel(ckpt)
        assert copies * n_trainable <= held < copies * n_trainable + 1024, (stage, held, n_trainable)
    for stage in (1, 2, 3):
        for step, loss in traj[0].items():
            assert traj[stage][step] == pytest.approx(loss, rel=1e-5), (stage, step)


@pytest.mark.parametrize("moe_tower,stages", [("text", (0, 3)), ("image", (0, 2))])
def test_locked_tower_with_moe_layers(tmp_path, moe_tower, stages):
    """LiT with sparse MoE: a locked dense image tower beside a learning MoE text tower, or a locked MoE image tower
    (experts and router frozen) beside a learning text tower. Locked weights stay bit-identical under the ZeRO
    stages, the stages follow one trajectory, exact accumulation included."""
    from vlpretrain.config import MoEConfig

    moe = MoEConfig(num_experts=4, towers=moe_tower, layers="every_2")
    torch.manual_seed(0)  # train.seed: the trainer builds the model right after seeding with it
    initial = build_model(ModelConfig(name="tiny-vit", moe=moe, lock_image=True)).state_dict()
    common = ["train.steps=2", "train.warmup_steps=1", "train.grad_accum=2", "model.lock_image=true",
              "model.moe.num_experts=4", f"model.moe.towers={moe_tower}", "model.moe.layers=every_2"]
    traj = {}
    for stage in stages:
        out = tmp_path / f"z{stage}"
        run(out, *common, f"train.zero_stage={stage}")
        traj[stage] = losses(out)
        final = load_state_dict(out / "checkpoints" / "step_00000002" / "model.safetensors")
        assert final.keys() == initial.keys()
        locked = [k for k in initial if k.startswith("visual.")]
        assert any(".experts." in k for k in locked) == (moe_tower == "image")
        for k in locked:
            assert torch.equal(final[k], initial[k]), (stage, k)
        learning = [k for k in initial if k.startswith("transformer.") and ".experts." in k] or ["text_projection"]
        assert any(not torch.equal(final[k], initial[k]) for k in learning), stage
    first, other = stages
    for step, loss in traj[first].items():
        assert traj[other][step] == pytest.approx(loss, rel=1e-5), (other, step)
