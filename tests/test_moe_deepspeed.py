"""The DeepSpeed MoE backend against the native layer: same weights give the same outputs, losses and file format.
Models are built native; the engine's `use_deepspeed_moe` swaps DeepSpeed's layer in."""

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import free_port, subprocess_env

from vlpretrain.config import MoEConfig
from vlpretrain.engine.moe import DeepSpeedMoEMLP, use_deepspeed_moe
from vlpretrain.models import build_model, export_state_dict, moe_layers, moe_losses
from vlpretrain.models.moe import convert_to_moe

pytest.importorskip("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model("tiny-vit")


def deepspeed_moe(dense, cfg):
    return use_deepspeed_moe(convert_to_moe(copy.deepcopy(dense), cfg), cfg)


def native_and_deepspeed(dense, k):
    cfg = MoEConfig(num_experts=4, top_k=k, towers="both", capacity_factor=8.0, eval_capacity_factor=0.0,
                    normalize_weights=k > 1)
    native = convert_to_moe(copy.deepcopy(dense), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # experts that differ, so routing matters
        for layer in moe_layers(native):
            for p in layer.experts.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ds = deepspeed_moe(dense, dataclasses.replace(cfg, backend="deepspeed"))
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
    again = deepspeed_moe(dense, MoEConfig(num_experts=4, top_k=2, towers="both", backend="deepspeed"))
    again.load_state_dict(ds.state_dict())
    assert all(torch.equal(v, ds.state_dict()[key]) for key, v in again.state_dict().items())


def test_the_swap_keeps_weights_locks_and_random_state(dense):
    cfg = MoEConfig(num_experts=4, top_k=2, towers="both", backend="deepspeed")
    native = convert_to_moe(copy.deepcopy(dense), cfg).eval()
    for p in native.visual.parameters():  # a locked image tower
        p.requires_grad_(False)
    want, layers = export_state_dict(native), len(moe_layers(native))
    before = torch.random.get_rng_state()
    ds = use_deepspeed_moe(native, cfg)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ds is native and len(moe_layers(ds)) == layers and all(isinstance(m, DeepSpeedMoEMLP) for m in moe_layers(ds))
    got = export_state_dict(ds)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in ds.visual.parameters())
    assert all(p.requires_grad for layer in moe_layers(ds) if layer.tower == "text" for p in layer.parameters())
    assert not any(layer.training for layer in moe_layers(ds))


def test_deepspeed_dropping_is_reported(dense):
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.25, backend="deepspeed")
    ds = deepspeed_moe(dense, cfg).train()
    ds(torch.randn(2, 3, 28, 28), torch.randint(0, 49408, (2, 16)))
    layer = moe_layers(ds)[0]
    # 34 image tokens (2 x 17): capacity ceil(34 / 4 * 0.5) = 5 slots per expert for 68 assignments: 48 drop
    assert layer.aux.dropped.item() >= 48 / 68
    assert layer.aux.load.sum().item() == pytest.approx(1.0)


@pytest.mark.slow
def test_two_processes_expert_parallel_and_engines(tmp_path):
    """ep_size 2 matches the native layer and trains under ZeRO-2; the native layer trains under ZeRO-3."""
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), os.path.join(REPO, "tests", "moe_ep_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"ok{rank}").read_text() == "ok"
