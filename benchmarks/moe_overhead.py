"""Training step time of upcycled MoE models over the dense model they came from, on the CPU.

One step is forward + CLIP loss (+ MoE auxiliary loss) + backward + AdamW step, in plain torch. The models take
turns step by step so that other load on shared cores hits all of them alike; the median step time is used.

    PYTHONPATH=. python benchmarks/moe_overhead.py [--arch tiny-vit --batch 128 --experts 8 --towers image]

The ratio has a floor set by compute: top-2 runs every token through two expert MLPs, so the step costs about
1 + (FLOP share of the MLPs made sparse) of the dense one; the script prints that FLOP ratio beside the measurement.
On a shared machine, compare runs made at the same time; `--threads 1` is the steadiest under load.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlpretrain.config import MoEConfig
from vlpretrain.models import build_model, count_parameters, moe_losses, upcycle
from vlpretrain.models.moe import TOWER_BLOCKS, TOWERS, select_blocks


def clip_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch plus the MoE auxiliary loss."""
    out = model(images, texts)
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    logits = scale.exp() * img @ txt.t()
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss + moe_losses(model)[0]


def step_time(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, texts: torch.Tensor) -> float:
    """Seconds of one optimizer step."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    clip_loss(model, images, texts).backward()
    opt.step()
    return time.perf_counter() - start


def mlp_share(model: nn.Module, images: torch.Tensor, texts: torch.Tensor, towers: str) -> float:
    """Fraction of a dense training step's FLOPs spent in the MLPs of the blocks that become MoE."""
    with FlopCounterMode(display=False) as counter:
        clip_loss(model, images, texts).backward()
    flops = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    root = type(model).__name__
    mlp = 0
    for tower in TOWERS[towers]:
        path = f"{root}.visual.transformer" if tower == "image" else f"{root}.transformer"
        for i in select_blocks("every_2", len(TOWER_BLOCKS[tower](model))):
            mlp += flops.get(f"{path}.resblocks.{i}.mlp", 0)
    return mlp / flops["Global"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--towers", default="image", choices=["image", "text", "both"])
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--steps", type=int, default=12, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = build_model(a.arch)
    size = dense.visual.image_size if isinstance(dense.visual.image_size, int) else dense.visual.image_size[0]
    images = torch.randn(a.batch, 3, size, size)
    texts = torch.randint(1, 49000, (a.batch, dense.context_length))
    models = {"dense": dense}
    for k in (1, 2):
        cfg = MoEConfig(num_experts=a.experts, top_k=k, layers="every_2", towers=a.towers,
                        capacity_factor=a.capacity_factor, normalize_weights=k > 1)
        models[f"top-{k}"] = upcycle(copy.deepcopy(dense), cfg)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(a.warmup + a.steps):
        for n, m in models.items():
            t = step_time(m, opts[n], images, texts)
            if i >= a.warmup:
                times[n].append(t)
    share = mlp_share(copy.deepcopy(dense), images, texts, a.towers)
    base = statistics.median(times["dense"])
    print(f"# {a.arch}, batch {a.batch}, {a.experts} experts every 2nd block of the {a.towers} tower(s), "
          f"capacity factor {a.capacity_factor}, {torch.get_num_threads()} threads, median of {a.steps} steps")
    print(f"# FLOP share of the MLPs that become MoE in a dense step: {share:.1%}")
    for n, m in models.items():
        med = statistics.median(times[n])
        counts = count_parameters(m)
        floor = "" if n == "dense" else f"  (FLOP ratio {1 + (int(n[-1]) - 1) * share:.2f}x)"
        _, stats = moe_losses(m)
        dropped = stats.get(f"moe/{a.towers if a.towers != 'both' else 'image'}/dropped", 0.0)
        print(f"{n:6s} step {med * 1000:8.1f} ms  ratio {med / base:5.2f}x{floor}  params {counts['total']:,} "
              f"(active {counts['active per token']:,})  dropped {dropped:.1%}")


if __name__ == "__main__":
    main()
