"""Training step time with a Hugging Face text tower (XLM-R layout) against open_clip's own text transformer of the
same width, depth, heads, MLP width, context and vocabulary, beside the same image tower.

One step is forward + CLIP loss + backward + AdamW step, in plain torch (no DeepSpeed: the towers are what differs).
The two models take turns step by step so that other load on shared cores hits both alike; medians are compared.
The "text only" figure times the text tower alone (encode_text, backward of its sum) for the same batch.

    PYTHONPATH=. python benchmarks/hf_text_tower.py                       # CPU: tiny towers
    PYTHONPATH=. python benchmarks/hf_text_tower.py --size base --device cuda --precision bf16 --batch 256

Nothing downloads: the HF tower is built from a config written to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.models import build_model

SIZES = {  # text width, layers, heads; image tower; context
    "tiny": dict(width=128, layers=2, heads=2, context=16,
                 vision={"image_size": 28, "layers": 4, "width": 128, "head_width": 64, "patch_size": 7}),
    "base": dict(width=512, layers=12, heads=8, context=77,
                 vision={"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}),
}
VOCAB = 49408


def write_archs(folder: Path, size: dict) -> tuple[str, str]:
    """Model JSONs for the open_clip text tower and the HF (XLM-R) one of the same shape."""
    from transformers import XLMRobertaConfig

    w, layers, heads, ctx = size["width"], size["layers"], size["heads"], size["context"]
    XLMRobertaConfig(vocab_size=VOCAB, hidden_size=w, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * w, max_position_embeddings=ctx + 2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0).save_pretrained(str(folder / "xlmr"))
    base = {"embed_dim": w, "vision_cfg": size["vision"]}
    ours = {**base, "text_cfg": {"context_length": ctx, "vocab_size": VOCAB, "width": w, "heads": heads,
                                 "layers": layers}}
    hf = {**base, "text_cfg": {"hf_model_name": str(folder / "xlmr"), "hf_proj_type": "linear",
                               "hf_pooler_type": "mean_pooler", "context_length": ctx}}
    paths = []
    for name, arch in (("openclip-text", ours), ("hf-text", hf)):
        (folder / f"{name}.json").write_text(json.dumps(arch))
        paths.append(str(folder / f"{name}.json"))
    return paths[0], paths[1]


def clip_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, texts: torch.Tensor,
              autocast) -> None:
    """One optimizer step of the symmetric InfoNCE loss."""
    opt.zero_grad(set_to_none=True)
    with autocast():
        out = model(images, texts)
        logits = out["logit_scale"].exp() * out["image_features"] @ out["text_features"].t()
        labels = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    opt.step()


def text_step(model: nn.Module, texts: torch.Tensor, autocast) -> None:
    """The text tower's forward and backward alone."""
    with autocast():
        feats = model.encode_text(texts)
    feats.float().sum().backward()
    model.zero_grad(set_to_none=True)


def timed(device: torch.device, fn, *args) -> float:
    """Seconds of fn(*args), the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(a.device)
    size = SIZES[a.size]

    def autocast():
        if a.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        archs = write_archs(Path(tmp), size)
        models = {}
        for name, arch in zip(("open_clip text", "HF text (XLM-R)"), archs):
            torch.manual_seed(0)
            m = build_model(arch).to(device).train()
            models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(0)
    res = size["vision"]["image_size"]
    images = torch.randn(a.batch, 3, res, res, generator=g).to(device)
    texts = torch.randint(5, VOCAB, (a.batch, size["context"]), generator=g).to(device)
    step_times: dict[str, list[float]] = {n: [] for n in models}
    text_times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(a.warmup + a.steps):
        for name, (m, opt) in models.items():  # in turns: shared load hits both
            s = timed(device, clip_step, m, opt, images, texts, autocast)
            t = timed(device, text_step, m, texts, autocast)
            if i >= a.warmup:
                step_times[name].append(s)
                text_times[name].append(t)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {a.precision}, "
          f"size {a.size} (text width {size['width']}, {size['layers']} layers), batch {a.batch}, {a.steps} steps")
    med = {n: (statistics.median(step_times[n]), statistics.median(text_times[n])) for n in models}
    for name, (m, _) in models.items():
        text_params = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.visual.parameters())
        print(f"{name:17s}: step {med[name][0] * 1e3:8.1f} ms   text fwd+bwd {med[name][1] * 1e3:8.1f} ms   "
              f"text params {text_params:,}")
    base, hf = med["open_clip text"], med["HF text (XLM-R)"]
    print(f"ratio HF / open_clip: step {hf[0] / base[0]:.2f}x   text tower {hf[1] / base[1]:.2f}x")


if __name__ == "__main__":
    main()
