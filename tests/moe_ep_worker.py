"""One rank of the 2-process MoE check (run by torchrun from test_moe_deepspeed.py; writes OUT/ok{rank}).

1. The DeepSpeed backend with ep_size 2 (two experts per rank, tokens by all-to-all) gives the native layer's
   output for the same weights on each rank's own batch, and `export_state_dict` gathers every expert.
2. It takes an optimizer step in a DeepSpeed engine under ZeRO-2 with `moe_param_groups`.
3. The native layer takes an optimizer step under ZeRO-3 while the ranks route to different experts.
"""

import dataclasses
import sys
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F

from vlpretrain.config import ModelConfig, MoEConfig
from vlpretrain.engine.moe import moe_param_groups, setup_expert_parallel, use_deepspeed_moe
from vlpretrain.models import build_model, export_state_dict, moe_layers, moe_losses


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 28, 28, generator=g), torch.randint(0, 49408, (4, 16), generator=g)


def loss_of(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    out = model(images, texts)
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    logits = scale.exp() * img @ txt.t()
    labels = torch.arange(len(images))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels) + moe_losses(model)[0]


def engine_step(model: torch.nn.Module, stage: int, images: torch.Tensor, texts: torch.Tensor) -> None:
    """One step; asserts that every expert of the middle MoE layers moved (in a tower's last block only the
    pooled token's output matters, so an expert no pooled token chose rightly gets a zero gradient there)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".resblocks.1.mlp." in n}
    opt = torch.optim.AdamW(moe_param_groups([{"params": list(model.parameters())}]), lr=1e-3, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine.backward(loss_of(engine.module, images, texts))
    engine.step()
    if stage == 3:
        return  # partitioned parameters: the finite, completed step is the check
    for n, p in engine.module.named_parameters():
        if n in before:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not move"


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = MoEConfig(num_experts=4, top_k=2, towers="both", capacity_factor=8.0, eval_capacity_factor=0.0)
    torch.manual_seed(0)
    native = build_model(ModelConfig(name="tiny-vit", moe=cfg)).eval()
    ds_cfg = dataclasses.replace(cfg, backend="deepspeed", ep_size=2)
    ds = use_deepspeed_moe(build_model(ModelConfig(name="tiny-vit", moe=ds_cfg)), ds_cfg).eval()
    ds.load_state_dict(native.state_dict())
    assert all(layer.num_local == 2 for layer in moe_layers(ds))
    setup_expert_parallel(ds)
    images, texts = batch(100 + rank)
    with torch.no_grad():
        a, b = native(images, texts), ds(images, texts)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in ("image_features", "text_features")), "ep_size 2 differs"
    gathered, want = export_state_dict(ds), native.state_dict()
    assert gathered.keys() == want.keys() and all(torch.equal(gathered[k], want[k]) for k in want)

    trained = use_deepspeed_moe(build_model(ModelConfig(name="tiny-vit", moe=ds_cfg)), ds_cfg)
    trained.load_state_dict(native.state_dict())
    engine_step(trained, 2, images, texts)

    torch.manual_seed(0)
    zero3 = build_model(ModelConfig(name="tiny-vit", moe=dataclasses.replace(cfg, capacity_factor=1.0)))
    engine_step(zero3, 3, images, texts)
    (out / f"ok{rank}").write_text("ok")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
