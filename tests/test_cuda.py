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

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "train_synthetic.py"
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")},
       "DS_ACCELERATOR": "cuda", "PYTHONPATH": str(REPO)}


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
    fp32 = train(tmp_path / "fp32", "train.steps=6")
    bf16 = train(tmp_path / "bf16", "train.steps=6", "train.precision=bf16")
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=3e-2), step


def test_compile_trajectory_matches_eager(tmp_path):
    eager = train(tmp_path / "eager", "train.steps=4")
    compiled = train(tmp_path / "compiled", "train.steps=4", "model.compile=true")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), step


def test_checkpoint_round_trip_on_the_gpu(tmp_path):
    straight = train(tmp_path / "straight", "train.steps=4")
    train(tmp_path / "resumed", "train.steps=4", "train.stop_after=2")
    resumed = train(tmp_path / "resumed", "train.steps=4", "--resume", "latest")
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
