"""Shared fixtures: quiet, single-threaded torch and the CPU DeepSpeed accelerator for every test."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vlpretrain/torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def repo_root() -> str:
    return REPO
