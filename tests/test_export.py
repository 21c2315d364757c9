"""vlpretrain export: our safetensors, and open_clip's local model folder that open_clip itself loads."""

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from helpers import REPO, subprocess_env

from vlpretrain.config import ModelConfig, MoEConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, export_model, export_open_clip_dir, load_model


def test_open_clip_local_dir_loads_in_open_clip_with_identical_features(tmp_path):
    model = build_model("tiny-vit").eval()
    ours = export_model(model, ModelConfig(name="tiny-vit"), tmp_path / "m.safetensors")
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "export", str(ours), str(tmp_path / "dir"),
                        "--format", "open_clip"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "dir" / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"} and config["preprocess_cfg"]["size"] in (28, [28, 28])
    # open_clip alone, without our configs registered: the architecture travels in the folder
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'dir'}")
    clip.eval()
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 4000, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(clip.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=0)
        assert float(clip.logit_scale) == float(model.logit_scale.reshape(()))
    assert load_model(str(ours)) is not None


def test_moe_models_cannot_be_open_clip_folders(tmp_path):
    cfg = ModelConfig(name="tiny-vit", moe=MoEConfig(num_experts=2, top_k=1, normalize_weights=False))
    with pytest.raises(ConfigError, match="open_clip has no MoE layers"):
        export_open_clip_dir(build_model(cfg).state_dict(), cfg, tmp_path / "dir")
