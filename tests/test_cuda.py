"""The GPU branches, skipped without CUDA; `benchmarks/gpu_suite.sh` runs them on a GPU machine.

Each compares a GPU run with its CPU-verified twin: the NCCL gather (reduce-scatter backward), bf16 against fp32
training, compile against eager, and a checkpoint round trip.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SCRIPT, subprocess_env

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENV = subprocess_env(DS_ACCELERATOR="cuda")


def train(out: Path, *args: str) -> dict[int, float]:
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "data.batch_size=32", *args], env=ENV,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_nccl_gather_carries_gradients_to_the_local_rows():
    import torch.distributed as dist

    from vlpretrain.loss import gather_features

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.randn(4, 8, device="cuda", requires_grad=True)
        g = gather_features(x, 1)
        (g * torch.arange(8, device="cuda")).sum().backward()
        torch.testing.assert_close(x.grad, torch.arange(8, device="cuda").float().expand(4, 8))
    finally:
        dist.destroy_process_group()


def test_bf16_trajectory_stays_close_to_fp32(tmp_path):
    fp32 = train(tmp_path / "fp32", "train.steps=6", "train.precision=fp32")
    bf16 = train(tmp_path / "bf16", "train.steps=6", "train.precision=bf16")
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=3e-2), step


def test_compile_trajectory_matches_eager(tmp_path):
    for precision, rel in (("fp32", 1e-3), ("bf16", 3e-2)):
        eager = train(tmp_path / f"eager-{precision}", "train.steps=4", f"train.precision={precision}")
        compiled = train(tmp_path / f"compiled-{precision}", "train.steps=4", f"train.precision={precision}",
                         "model.compile=true")
        for step in eager:
            assert compiled[step] == pytest.approx(eager[step], rel=rel), (precision, step)


def test_compile_with_exact_accumulation(tmp_path):
    common = ("--per-sample", "train.steps=3", "train.precision=fp32", "train.warmup_steps=1")
    big = train(tmp_path / "big", *common, "data.batch_size=32")
    exact = train(tmp_path / "exact", *common, "data.batch_size=16", "train.grad_accum=2", "model.compile=true")
    assert exact[1] == pytest.approx(big[1], rel=1e-3)  # the first step sees the same samples


def test_checkpoint_round_trip_on_the_gpu(tmp_path):
    straight = train(tmp_path / "straight", "train.steps=4", "train.precision=fp32")
    train(tmp_path / "resumed", "train.steps=4", "train.precision=fp32", "train.stop_after=2")
    resumed = train(tmp_path / "resumed", "train.steps=4", "train.precision=fp32", "--resume", "latest")
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_auto_precision_is_bf16_on_a_gpu():
    from vlpretrain.config import load_config
    from vlpretrain.trainer import resolve_auto

    cfg = resolve_auto(load_config(None, ["data.train=unused"]), torch.device("cuda"))
    assert cfg.train.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_no_device_sync_of_ours_between_logging_steps(tmp_path):
    """The CPU test (tests/test_host_sync.py) patches Tensor methods; here torch.cuda's sync debug mode sees every
    synchronising call. Ours must be none between logging steps; DeepSpeed's (its per-step gradient-norm check)
    are printed by benchmarks/gpu_suite.sh."""
    r = subprocess.run([sys.executable, str(REPO / "tests" / "host_sync_probe.py"), str(tmp_path / "run"),
                        "data.batch_size=32"], env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    quiet = [s for s in range(1, 10) if s not in got["logged"]]
    ours = {s: [x for x in got["device_syncs"].get(str(s), []) if "vlpretrain/" in x] for s in quiet}
    assert {s: x for s, x in ours.items() if x} == {}


def test_attention_takes_fused_kernels():
    """Every block of open_clip's ViT-B-16 runs flash or memory-efficient attention in bf16: with the math
    kernel ruled out, a fallback would raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlpretrain.models import build_model

    model = build_model("ViT-B-16").cuda().to(torch.bfloat16).train()
    images = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    texts = torch.randint(0, 49408, (2, 77), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = model(images, texts)
        (out["image_features"].float().sum() + out["text_features"].float().sum()).backward()
    assert torch.isfinite(out["image_features"]).all()


def test_resnet_trains_with_channels_last_inputs_and_prefetch(tmp_path):
    """On a GPU a ResNet tower gets NHWC images through the prefetching loader path; its trajectory follows fp32 on
    the CPU-verified maths (bf16 against fp32 on the GPU)."""
    resnet = ("--image-size", "32", "--context", "24", "model.name=tiny-resnet", "train.steps=4")
    fp32 = train(tmp_path / "fp32", *resnet, "train.precision=fp32")
    bf16 = train(tmp_path / "bf16", *resnet)
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=3e-2), step
