"""The run-config schema: YAML + overrides, and one-line errors naming file and key (exit 2, no traceback)."""

import glob
import os
import re
import subprocess
import sys

import pytest

from vlpretrain.config import RunConfig, dump_yaml, load_config, reference_markdown
from vlpretrain.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vlpretrain.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "data: {train: a.tar}\ntrain: {lr: 0.1, steps: 7, warmup_steps: 2}\n")
    cfg = load_config(p, ["train.lr=0.5", "model.moe.num_experts=4", "eval.benchmarks=[cifar10,mnist]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7
    assert cfg.model.moe.num_experts == 4
    assert cfg.eval.benchmarks == ["cifar10", "mnist"]
    assert cfg.data.train == "a.tar"
    assert cfg.train.weight_decay == 0.2  # schema default


def test_int_widens_to_float(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: a.tar}\ntrain: {lr: 1}\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text,key", [
    ("data: {train: a.tar}\ntrain: {learning_rat: 0.1}\n", "train.learning_rat: unknown key"),
    ("data: {train: a.tar}\ntrain: {steps: ten}\n", "train.steps: expected int"),
    ("data: {train: a.tar}\ntrain: {zero_stage: 4}\n", "train.zero_stage: expected"),
    ("data: {train: a.tar}\nmodle: {name: x}\n", "modle: unknown key"),
    ("train: {steps: 3}\n", "data.train: required value missing"),
    ("data: {train: a.tar}\nmodel: {pretrained: /nonexistent/w.pt}\n", "model.pretrained: path does not exist"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(p) and key in str(e.value)


def test_bad_override_named(tmp_path):
    p = write(tmp_path, "data: {train: a.tar}\n")
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(p, ["train.lr=fast"])


@pytest.mark.parametrize("text,needle", [
    ("data: {train: a.tar}\ntrain: {learning_rat: 0.1}\n", "train.learning_rat"),
    ("data: {train: a.tar}\ntrain: {steps: [1]}\n", "train.steps"),
    ("data: {train: a.tar}\ntrain: {remote_dir: 'dropbox://b/run'}\n",
     "train.remote_dir: dropbox:// needs its fsspec backend (DropboxFileSystem requires"),
])
def test_cli_exit_2_one_line(tmp_path, text, needle):
    p = write(tmp_path, text)
    r = cli("info", "--config", p, "--no-model")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and p in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_missing_file():
    r = cli("info", "--config", "/nonexistent/run.yaml", "--no-model")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: /nonexistent/run.yaml: config file does not exist"


def _lines(path: str) -> list[str]:
    return [line for line in open(path, encoding="utf-8").read().splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_configs_resolve(path, tmp_path):
    cwd = REPO
    name = os.path.basename(path)
    if name in ("demo-multilingual.yaml", "demo-coca.yaml"):
        # its model reads the tokenizer its make target trains (runs/multilingual-tokenizer, runs/coca-tokenizer,
        # relative to the working folder): train a small one on the same caption files, in a folder of its own
        from vlpretrain.tokenizer import train_tokenizer

        cwd = tmp_path
        (tmp_path / "configs").symlink_to(os.path.join(REPO, "configs"))
        captions = os.path.join(REPO, "configs", "captions")
        if name == "demo-coca.yaml":
            templates, classes = (_lines(os.path.join(captions, f"fashion_{f}.txt")) for f in ("train", "classes"))
            texts = [t.replace("{c}", c) for t in templates for c in classes]
            train_tokenizer(texts, 512, tmp_path / "runs" / "coca-tokenizer", "bpe", lowercase=True)
        else:
            texts = [line for f in sorted(glob.glob(os.path.join(captions, "multilingual", "*.txt")))
                     for line in _lines(f)]
            train_tokenizer(texts, 400, tmp_path / "runs" / "multilingual-tokenizer", lowercase=True)
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "info", "--config", path, "--set",
                        "model.pretrained=null"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "# resolved config" in r.stdout and "parameters" in r.stdout
    assert "total:" in r.stdout


def test_dump_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: [a.tar, b.tar], weights: [1, 3], mode: resampled, "
                                      "train_num_samples: 100}\n"))
    again = load_config(write(tmp_path, dump_yaml(cfg), "again.yaml"))
    assert again == cfg


def test_config_reference_in_step():
    doc = open(os.path.join(REPO, "docs", "config.md")).read()
    assert reference_markdown() in doc, "docs/config.md is stale: run `python -m vlpretrain.config docs/config.md`"


def test_help_lists_subcommands():
    r = cli("--help")
    assert r.returncode == 0
    assert re.search(r"\binfo\b", r.stdout)


def test_exponent_floats(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: a.tar}\ntrain: {lr: 1e-3}\n"), ["train.min_lr=5e-6"])
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 5e-6


def test_auto_precision_is_fp32_on_cpus_and_saved_concrete():
    import torch

    from vlpretrain.trainer import resolve_auto

    cfg = load_config(None, ["data.train=unused"])
    assert cfg.train.precision == "auto"
    assert resolve_auto(cfg, torch.device("cpu")).train.precision == "fp32"
    explicit = load_config(None, ["data.train=unused", "train.precision=bf16"])
    assert resolve_auto(explicit, torch.device("cpu")).train.precision == "bf16"


def test_compile_under_zero3_is_refused_naming_the_key():
    # measured: dynamo fails on ZeRO-3's empty parameter placeholders ("b must be 2D"); ZeRO 0-2 compile fine
    with pytest.raises(ConfigError, match="model.compile: torch.compile cannot trace the model under ZeRO-3"):
        load_config(None, ["data.train=x", "model.compile=true", "train.zero_stage=3"])
    assert load_config(None, ["data.train=x", "model.compile=true", "train.zero_stage=2"]).model.compile


def test_a_renamed_key_keeps_working_and_both_names_are_refused():
    cfg = load_config(None, ["data.train=x", "data.mode=resampled", "data.samples_per_epoch=100"])
    assert cfg.data.train_num_samples == 100
    with pytest.raises(ConfigError, match=r"data\.samples_per_epoch: renamed to data\.train_num_samples"):
        load_config(None, ["data.train=x", "data.samples_per_epoch=1", "data.train_num_samples=2"])
