"""The native MoE layer on hand-worked inputs, conversion of open_clip towers, losses, counts and config checks."""

import dataclasses
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from vlpretrain.config import ModelConfig, MoEConfig, load_config
from vlpretrain.engine.moe import moe_param_groups
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, count_parameters
from vlpretrain.models.moe import (
    MoEMLP,
    convert_to_moe,
    moe_layers,
    moe_losses,
    validate_moe_config,
)


def sig(z):
    return 1 / (1 + math.exp(-z))


def scaling_layer(cfg: MoEConfig) -> MoEMLP:
    """2-d tokens, router = identity (logits are the tokens), expert e multiplies its input by e + 1."""
    mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(2, 2)), ("gelu", nn.Identity()), ("c_proj", nn.Linear(2, 2))]))
    layer = MoEMLP(mlp, 2, cfg, tower="image", block=0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
        for e, expert in enumerate(layer.experts):
            expert.c_fc.weight.copy_(torch.eye(2))
            expert.c_proj.weight.copy_(torch.eye(2) * (e + 1))
            expert.c_fc.bias.zero_()
            expert.c_proj.bias.zero_()
    return layer


TOKENS = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [2.0, 0.0]]])  # [batch 1, 4 tokens, d 2]


def test_layer_top1_dropped_token_outputs_zero():
    layer = scaling_layer(MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, normalize_weights=False))
    out = layer.train()(TOKENS)
    # capacity 2: expert 0 (x1) serves tokens 0 and 2, expert 1 (x2) token 1, token 3 is dropped
    want = torch.tensor([[[sig(1), 0.0], [0.0, 2 * sig(1)], [3 * sig(3), 0.0], [0.0, 0.0]]])
    assert torch.allclose(out, want, atol=1e-6)
    assert layer.aux.dropped.item() == pytest.approx(0.25)
    assert layer.aux.load.tolist() == [0.75, 0.25]


def test_layer_eval_capacity_and_batch_priority():
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=1.0, eval_capacity_factor=0.0, normalize_weights=False)
    out = scaling_layer(cfg).eval()(TOKENS)  # eval factor <= 0: nothing drops
    assert torch.allclose(out[0, 3], torch.tensor([2 * sig(2), 0.0]), atol=1e-6)
    prio = scaling_layer(dataclasses.replace(cfg, batch_priority=True)).train()(TOKENS)
    # with priority, token 0 (least confident for expert 0) drops instead of token 3
    assert torch.allclose(prio[0, 0], torch.zeros(2)) and torch.allclose(prio[0, 3], torch.tensor([2 * sig(2), 0.0]))


def test_layer_top2_normalised_combine():
    layer = scaling_layer(MoEConfig(num_experts=2, top_k=2, capacity_factor=2.0, normalize_weights=True))
    out = layer.train()(TOKENS)
    # both experts see every token: out = (p0 * 1 + p1 * 2) x with p the softmax of the token itself
    for t in range(4):
        p = torch.softmax(TOKENS[0, t], 0)
        assert torch.allclose(out[0, t], (p[0] + 2 * p[1]) * TOKENS[0, t], atol=1e-6)


def test_layer_aux_losses_by_hand():
    layer = scaling_layer(MoEConfig(num_experts=2, top_k=1, normalize_weights=False))
    layer.train()(TOKENS)
    probs = [[sig(1), sig(-1)], [sig(-1), sig(1)], [sig(3), sig(-3)], [sig(2), sig(-2)]]
    mean = [sum(p[e] for p in probs) / 4 for e in range(2)]
    assert layer.aux.balance.item() == pytest.approx(2 * (0.75 * mean[0] + 0.25 * mean[1]), rel=1e-6)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in TOKENS[0].tolist()]
    assert layer.aux.zloss.item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)


def test_every_expert_gets_a_gradient_even_without_tokens():
    layer = scaling_layer(MoEConfig(num_experts=2, top_k=1, capacity_factor=4.0))
    x = torch.tensor([[[5.0, 0.0], [4.0, 1.0]]])  # both tokens choose expert 0
    (layer.train()(x).sum() + layer.aux.balance + layer.aux.zloss).backward()
    grads = [p.grad for p in layer.experts[1].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_router_runs_in_fp32_and_jitter_only_in_training():
    layer = scaling_layer(MoEConfig(num_experts=2, top_k=1, jitter=0.5))
    x = torch.tensor([[1.0, 2.0]] * 64)
    clean = layer.eval().router_logits(x)
    assert torch.equal(clean, x)
    noisy = layer.train().router_logits(x.bfloat16())
    assert noisy.dtype == torch.float32
    assert not torch.equal(noisy, x) and ((noisy / x) - 1).abs().max() <= 0.5


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return build_model("tiny-vit")


def converted(dense, **moe):
    import copy

    return convert_to_moe(copy.deepcopy(dense), MoEConfig(**moe))


def test_convert_picks_towers_and_blocks(tiny_vit):
    m = converted(tiny_vit, num_experts=4, towers="image", layers="every_2")
    assert [(x.tower, x.block) for x in moe_layers(m)] == [("image", 1), ("image", 3)]
    assert isinstance(m.visual.transformer.resblocks[1].mlp, MoEMLP)
    assert not isinstance(m.visual.transformer.resblocks[0].mlp, MoEMLP)
    both = converted(tiny_vit, num_experts=4, towers="both", layers=[0, -1])
    assert [(x.tower, x.block) for x in moe_layers(both)] == [("image", 0), ("image", 3), ("text", 0), ("text", 1)]
    text = converted(tiny_vit, num_experts=4, towers="text", layers="last_1")
    assert [(x.tower, x.block) for x in moe_layers(text)] == [("text", 1)]
    # experts start as copies of the block's dense MLP
    dense_mlp = tiny_vit.transformer.resblocks[1].mlp
    for expert in moe_layers(text)[0].experts:
        assert torch.equal(expert.c_fc.weight, dense_mlp.c_fc.weight)
        assert torch.equal(expert.c_proj.bias, dense_mlp.c_proj.bias)
    with pytest.raises(ConfigError, match="already has MoE layers"):
        convert_to_moe(text, MoEConfig(num_experts=4))


def test_resnet_image_tower_has_no_blocks():
    with pytest.raises(ConfigError, match=r"model.moe.towers: the image tower \(ModifiedResNet\).*towers: text"):
        build_model(ModelConfig(name="tiny-resnet", moe=MoEConfig(num_experts=2, towers="image")))
    m = build_model(ModelConfig(name="tiny-resnet", moe=MoEConfig(num_experts=2, towers="text")))
    assert [x.tower for x in moe_layers(m)] == ["text"]


def test_parameter_counts(tiny_vit):
    m = converted(tiny_vit, num_experts=4, top_k=2, towers="image", layers="every_2")
    dense, moe = count_parameters(tiny_vit), count_parameters(m)
    expert = 2 * 128 * 512 + 512 + 128  # c_fc + c_proj weights and biases (tiny-vit image width 128)
    router = 4 * 128
    assert moe["total"] == dense["total"] + 2 * (3 * expert + router)
    assert moe["active per token"] == moe["total"] - 2 * (2 * expert)  # 2 of 4 experts idle per token
    assert moe["active per token"] < moe["total"]
    assert moe["text tower and rest"] == dense["text tower and rest"]


def test_moe_losses_weights_and_stats(tiny_vit):
    m = converted(tiny_vit, num_experts=4, top_k=2, towers="both", aux_loss_weight=0.5, z_loss_weight=0.25)
    total, stats = moe_losses(m)
    assert total.item() == 0 and stats == {}  # nothing ran yet
    m(torch.randn(2, 3, 28, 28), torch.randint(0, 49408, (2, 16)))
    total, stats = moe_losses(m)
    layers = moe_layers(m)
    want = sum(0.5 * x.aux.balance + 0.25 * x.aux.zloss for x in layers)
    assert torch.allclose(total, want) and total.requires_grad
    image = [x for x in layers if x.tower == "image"]
    assert stats["moe/image/balance"] == pytest.approx(sum(x.aux.balance.item() for x in image) / 2)
    assert stats["moe/text/zloss"] == pytest.approx(moe_layers(m)[-1].aux.zloss.item())
    assert stats["moe/image/dropped"] >= 0 and stats["moe/image/load_max"] >= 1.0
    assert sum(stats[f"moe/image/b1/e{e}"] for e in range(4)) == pytest.approx(1.0)


@pytest.mark.parametrize("changes,needle", [
    ({"top_k": 5}, "model.moe.top_k"),
    ({"num_experts": 0}, "model.moe.num_experts"),
    ({"ep_size": 2}, "model.moe.ep_size: the native backend"),
    ({"backend": "deepspeed", "ep_size": 3}, "model.moe.ep_size: must divide"),
    ({"backend": "deepspeed", "batch_priority": True}, "model.moe.batch_priority"),
    ({"backend": "deepspeed", "jitter": 0.1}, "model.moe.jitter"),
    ({"backend": "deepspeed", "top_k": 1}, "model.moe.normalize_weights: .* set it to false"),
    ({"backend": "deepspeed", "normalize_weights": False}, "model.moe.normalize_weights: .* set it to true"),
])
def test_config_errors(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_moe_config(dataclasses.replace(MoEConfig(num_experts=4, top_k=2), **changes))


def test_engine_compat():
    def run_config(backend: str, stage: int):
        return load_config(None, ["data.train=x.tar", "model.moe.num_experts=4", f"model.moe.backend={backend}",
                                  f"train.zero_stage={stage}"])

    with pytest.raises(ConfigError, match="ZeRO-3"):
        run_config("deepspeed", 3)
    run_config("deepspeed", 2)
    run_config("native", 3)  # the native layer runs under ZeRO-3


def test_param_groups_native_is_identity(tiny_vit):
    m = converted(tiny_vit, num_experts=2, top_k=1, normalize_weights=False)
    params = list(m.parameters())
    groups = moe_param_groups([{"params": params[:3], "weight_decay": 0.0}, {"params": params[3:]}])
    assert [g["name"] for g in groups] == ["group0", "group1"]
    assert sum(len(g["params"]) for g in groups) == len(params) and groups[0]["weight_decay"] == 0.0


def test_gradient_checkpointing_recomputes_the_same_routing(tiny_vit):
    m = converted(tiny_vit, num_experts=4, top_k=2, towers="both", jitter=0.01)
    ckpt = converted(tiny_vit, num_experts=4, top_k=2, towers="both", jitter=0.01)
    ckpt.load_state_dict(m.state_dict())
    ckpt.set_grad_checkpointing(True)
    images, texts = torch.randn(2, 3, 28, 28), torch.randint(0, 49408, (2, 16))
    grads = []
    for model in (m, ckpt):
        torch.manual_seed(1)  # same jitter noise
        out = model(images, texts)
        ((out["image_features"] @ out["text_features"].t()).sum() + out["moe_aux"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert grads[1]["visual.transformer.resblocks.1.mlp.router.weight"].abs().sum() > 0


def test_bf16_parameters_keep_an_fp32_router():
    cfg = MoEConfig(num_experts=2, top_k=2, capacity_factor=2.0)
    layer = scaling_layer(cfg).to(torch.bfloat16).train()
    out = layer(TOKENS.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.aux.balance.dtype == torch.float32
    want = scaling_layer(cfg).train()(TOKENS)
    assert torch.allclose(out.float(), want, atol=0.05)


def test_padded_dispatch_equals_exact_size_slices():
    """Training dispatch runs each expert on a fixed [capacity, d] slice (static shapes, no host sync); it must give
    the outputs and gradients of running each expert on exactly its routed tokens, drops included."""
    from vlpretrain.models.moe import route

    torch.manual_seed(0)
    mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(8, 16)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(16, 8))]))
    layer = MoEMLP(mlp, 8, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.75), tower="image", block=0)
    for expert in layer.experts:  # distinct experts, so a token sent to the wrong one would show
        torch.nn.init.normal_(expert.c_fc.weight)
    tokens = torch.randn(24, 8, requires_grad=True)
    r = route(layer.router_logits(tokens), 2, capacity=9)
    assert not r.keep.all() and r.keep.any()  # some assignments dropped, some kept

    padded = torch.zeros(24, 8).index_add(0, r.sorted_token, layer._padded_experts(tokens, r) * r.sorted_weight[:, None])
    slices = tokens.index_select(0, r.token).split(r.counts.tolist())
    y = torch.cat([expert(s) for expert, s in zip(layer.experts, slices)])
    exact = torch.zeros(24, 8).index_add(0, r.token, y * r.slot_weight[:, None])
    torch.testing.assert_close(padded, exact, rtol=1e-6, atol=1e-6)
    g_padded = torch.autograd.grad(padded.square().sum(), [tokens, *layer.parameters()], allow_unused=True,
                                   retain_graph=True)  # the routing graph is shared
    g_exact = torch.autograd.grad(exact.square().sum(), [tokens, *layer.parameters()], allow_unused=True)
    for a, b in zip(g_padded, g_exact):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
