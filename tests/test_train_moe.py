"""MoE towers under the trainer: 2-process runs with the native layer (ZeRO-3) and DeepSpeed's expert-parallel
layer (ep_size 2) follow the same loss trajectory, export and reload; DeepSpeed MoE under ZeRO-3 is refused."""

import json

import pytest
import torch
from helpers import losses, run

from vlpretrain.models import load_model

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.towers=both", "model.moe.capacity_factor=8.0",
       "train.steps=4"]


@pytest.mark.slow
def test_native_zero3_and_deepspeed_expert_parallel_agree(tmp_path):
    run(tmp_path / "native", *MOE, "train.zero_stage=3", nproc=2)
    run(tmp_path / "ds", *MOE, "train.zero_stage=2", "model.moe.backend=deepspeed", "model.moe.ep_size=2", nproc=2)
    a, b = losses(tmp_path / "native"), losses(tmp_path / "ds")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    rows = [json.loads(x) for x in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["moe/image/dropped"] == 0.0 and "moe/text/balance" in rows[0]
    # both exports hold every expert under native names and reload into one model with equal features
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    feats = []
    for name in ("native", "ds"):
        m = load_model(str(tmp_path / name / "checkpoints" / "step_00000004" / "model.safetensors")).eval()
        with torch.no_grad():
            feats.append(m.encode_image(images))
    torch.testing.assert_close(feats[0], feats[1], rtol=1e-3, atol=1e-4)


def test_deepspeed_moe_under_zero3_is_refused(tmp_path):
    r = run(tmp_path / "bad", *MOE, "train.zero_stage=3", "model.moe.backend=deepspeed", check=False)
    assert r.returncode == 2
    assert "zero" in r.stderr.lower() and "deepspeed" in r.stderr.lower()
    assert "Traceback" not in r.stderr
