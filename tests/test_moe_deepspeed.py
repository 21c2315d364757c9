"""The DeepSpeed MoE backend against the native layer: same weights give the same outputs, losses and file format."""

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from vlpretrain.config import MoEConfig
from vlpretrain.models import build_model, export_state_dict, moe_layers, moe_losses
from vlpretrain.models.moe import convert_to_moe

pytest.importorskip("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model("tiny-vit")


def native_and_deepspeed(dense, k):
    cfg = MoEConfig(num_experts=4, top_k=k, towers="both", capacity_factor=8.0, eval_capacity_factor=0.0,
                    normalize_weights=k > 1)
    native = convert_to_moe(copy.deepcopy(dense), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # experts that differ, so routing matters
        for layer in moe_layers(native):
            for p in layer.experts.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ds = convert_to_moe(copy.deepcopy(dense), dataclasses.replace(cfg, backend="deepspeed"))
    ds.load_state_dict(native.state_dict())  # native names load into DeepSpeed's layout
    return native, ds


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_same_outputs_and_losses(dense, k, training):
    native, ds = native_and_deepspeed(dense, k)
    torch.manual_seed(3)
    images, texts = torch.randn(3, 3, 28, 28), torch.randint(0, 49408, (3, 16))
    a = native.train(training)(images, texts)
    b = ds.train(training)(images, texts)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in ("image_features", "text_features"))
    (la, sa), (lb, sb) = moe_losses(native), moe_losses(ds)
    assert la.item() == pytest.approx(lb.item(), rel=1e-5)
    assert sa.keys() == sb.keys() and all(sa[key] == pytest.approx(sb[key], abs=1e-6) for key in sa)


def test_one_file_format(dense):
    native, ds = native_and_deepspeed(dense, 2)
    assert any(".moe.deepspeed_moe.experts.deepspeed_experts.3.c_fc.weight" in key for key in ds.state_dict())
    exported, want = export_state_dict(ds), native.state_dict()
    assert exported.keys() == want.keys()
    assert all(torch.equal(exported[key], want[key]) for key in want)
    # DeepSpeed's own names load too (its engine checkpoints use them)
    again = convert_to_moe(copy.deepcopy(dense), MoEConfig(num_experts=4, top_k=2, towers="both", backend="deepspeed"))
    again.load_state_dict(ds.state_dict())
    assert all(torch.equal(v, ds.state_dict()[key]) for key, v in again.state_dict().items())


def test_deepspeed_dropping_is_reported(dense):
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.25, backend="deepspeed")
    ds = convert_to_moe(copy.deepcopy(dense), cfg).train()
    ds(torch.randn(2, 3, 28, 28), torch.randint(0, 49408, (2, 16)))
    layer = moe_layers(ds)[0]
    # 34 image tokens (2 x 17): capacity ceil(34 / 4 * 0.5) = 5 slots per expert for 68 assignments: 48 drop
    assert layer.aux.dropped.item() >= 48 / 68
    assert layer.aux.load.sum().item() == pytest.approx(1.0)


@pytest.mark.slow
def test_two_processes_expert_parallel_and_engines(tmp_path):
    """ep_size 2 matches the native layer and trains under ZeRO-2; the native layer trains under ZeRO-3."""
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29731", os.path.join(REPO, "tests", "moe_ep_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"ok{rank}").read_text() == "ok"
