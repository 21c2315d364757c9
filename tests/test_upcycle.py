"""Sparse upcycling: function preserved, experts copied, routers seeded, export/reload, the CLI."""

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import vlpretrain
from vlpretrain.cli import main
from vlpretrain.config import ModelConfig, MoEConfig
from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.models import build_model, export_model, load_model, moe_layers, read_export_config, upcycle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# no token drops (eval capacity <= 0, training capacity for every token) and combine weights sum to 1
EXACT = MoEConfig(num_experts=8, top_k=2, towers="both", layers="every_2", capacity_factor=8.0,
                  eval_capacity_factor=0.0, normalize_weights=True)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model("tiny-vit").eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 28, 28, generator=g), torch.randint(1, 49408, (4, 16), generator=g)


def features(model, inputs):
    with torch.no_grad():
        return model.encode_image(inputs[0]), model.encode_text(inputs[1])


@pytest.mark.parametrize("training", [False, True])
def test_upcycled_model_computes_the_dense_function(dense, inputs, training):
    moe = upcycle(dense, EXACT).train(training)
    assert len(moe_layers(moe)) == 3  # image blocks 1, 3 and text block 1
    (di, dt), (mi, mt) = features(dense, inputs), features(moe, inputs)
    assert torch.allclose(mi, di, atol=1e-5) and torch.allclose(mt, dt, atol=1e-5)
    assert all(layer.aux.dropped.item() == 0 for layer in moe_layers(moe))


def test_with_dropping_the_function_changes(dense, inputs):
    moe = upcycle(dense, dataclasses.replace(EXACT, capacity_factor=0.25)).train()
    assert not torch.allclose(features(moe, inputs)[0], features(dense, inputs)[0], atol=1e-3)


def test_weights_copied_and_routers_seeded(dense):
    a, b = upcycle(dense, EXACT, seed=5), upcycle(dense, EXACT, seed=5)
    c = upcycle(dense, EXACT, seed=6)
    ra, rb, rc = (m.visual.transformer.resblocks[1].mlp.router.weight for m in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert ra.std().item() == pytest.approx((0.1 / 128) ** 0.5, rel=0.1)  # Switch's init scale
    dense_state, moe_state = dense.state_dict(), a.state_dict()
    for key, value in moe_state.items():
        if ".mlp.experts." in key:
            block, rest = key.split(".mlp.experts.")
            assert torch.equal(value, dense_state[f"{block}.mlp.{rest.split('.', 1)[1]}"])
        elif ".mlp.router." not in key:
            assert torch.equal(value, dense_state[key]), key
    assert vlpretrain.upcycle is not None and not moe_layers(dense)  # the source is left dense


def test_export_reload_and_train_start(dense, inputs, tmp_path):
    cfg = dataclasses.replace(EXACT, eval_capacity_factor=2.0, towers="image")
    moe = upcycle(dense, cfg, tmp_path / "moe.safetensors", arch="tiny-vit").eval()
    stored = read_export_config(tmp_path / "moe.safetensors")
    assert stored.name == "tiny-vit" and stored.moe == cfg
    again = load_model(str(tmp_path / "moe.safetensors")).eval()
    for x, y in zip(features(moe, inputs), features(again, inputs)):
        assert torch.equal(x, y)
    # `train --set model.pretrained=OUT`: the run's own model config plus the file, on either backend
    for backend in ("native", "deepspeed"):
        run_moe = dataclasses.replace(cfg, backend=backend)
        started = build_model(ModelConfig(name="tiny-vit", pretrained=str(tmp_path / "moe.safetensors"),
                                          moe=run_moe)).eval()
        if backend == "deepspeed":  # as the engine does
            from vlpretrain.engine.moe import use_deepspeed_moe

            use_deepspeed_moe(started, run_moe)
        for x, y in zip(features(moe, inputs), features(started, inputs)):
            assert torch.allclose(x, y, atol=1e-6)
    with pytest.raises(CheckpointError, match="does not match the model"):
        build_model(ModelConfig(name="tiny-vit", pretrained=str(tmp_path / "moe.safetensors")))


def test_sources_export_and_open_clip_checkpoint(dense, inputs, tmp_path):
    export_model(dense, ModelConfig(name="tiny-vit"), tmp_path / "dense.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in dense.state_dict().items()}}, tmp_path / "dense.pt")
    want = features(dense, inputs)
    for source, arch in ((tmp_path / "dense.safetensors", None), (tmp_path / "dense.pt", "tiny-vit")):
        moe = upcycle(str(source), EXACT, arch=arch).eval()
        for x, y in zip(want, features(moe, inputs)):
            assert torch.allclose(x, y, atol=1e-5)
    with pytest.raises(ConfigError, match="name its architecture"):
        upcycle(str(tmp_path / "dense.pt"), EXACT)
    with pytest.raises(ConfigError, match="exported as 'tiny-vit'"):
        upcycle(str(tmp_path / "dense.safetensors"), EXACT, arch="tiny-resnet")
    with pytest.raises(CheckpointError, match="dense.pt: does not match"):
        upcycle(str(tmp_path / "dense.pt"), EXACT, arch="tiny-resnet")
    upcycle(copy.deepcopy(dense), EXACT, tmp_path / "moe.safetensors", arch="tiny-vit")
    with pytest.raises(ConfigError, match="already an MoE model"):
        upcycle(str(tmp_path / "moe.safetensors"), EXACT)
    with pytest.raises(ConfigError, match="name the architecture"):
        upcycle(dense, EXACT, tmp_path / "x.safetensors")


def test_cli_upcycle(dense, tmp_path, capsys):
    export_model(dense, ModelConfig(name="tiny-vit"), tmp_path / "dense.safetensors")
    out = tmp_path / "moe.safetensors"
    args = [sys.executable, "-m", "vlpretrain.cli", "upcycle", "--config", os.path.join(REPO, "configs/demo-moe.yaml"),
            "--out", str(out)]
    r = subprocess.run([*args, "--from", str(tmp_path / "dense.safetensors"), "--set", "model.moe.num_experts=2"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"train it with: vlpretrain train --config {REPO}/configs/demo-moe.yaml --set model.pretrained={out}" in r.stdout
    stored = read_export_config(out)
    assert stored.moe.num_experts == 2 and stored.moe.towers == "image"
    assert main(args[3:] + ["--from", str(out)]) == 2  # in-process: the same entry point, one line, exit 2
    assert capsys.readouterr().err.strip() == f"error: {out}: already an MoE model (2 experts); " \
                                              "upcycle a dense checkpoint"
