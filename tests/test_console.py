"""What a user sees on the console: quiet CPU runs, progress without a terminal, globs, wandb offline, clean output."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, SCRIPT, subprocess_env
from PIL import Image

from vlpretrain.data.plan import expand_shards
from vlpretrain.errors import ConfigError

ENV = subprocess_env()


def test_globs_expand_sorted_beside_braces_and_lists(tmp_path):
    for name in ["b-2.tar", "a-1.tar", "c-3.tar", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path / "*.tar")) == [[str(tmp_path / n) for n in ("a-1.tar", "b-2.tar", "c-3.tar")]]
    assert expand_shards([str(tmp_path / "?-2.tar"), str(tmp_path / "{a-1,c-3}.tar")]) == [
        [str(tmp_path / "b-2.tar")], [str(tmp_path / "a-1.tar"), str(tmp_path / "c-3.tar")]]
    with pytest.raises(ConfigError, match=r"names no shard"):
        expand_shards(str(tmp_path / "*.tgz"))


def test_the_loader_reads_a_glob(tmp_path):
    import io
    import tarfile

    from vlpretrain.config import DataConfig
    from vlpretrain.data import build_loader

    for s in range(2):
        with tarfile.open(tmp_path / f"part-{s}.tar", "w") as tar:
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 40, s * 100, 0)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"caption {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(train=str(tmp_path / "part-*.tar"), batch_size=4, workers=0, shuffle_buffer=0, augment=False)
    loader = build_loader(cfg, lambda im: torch.zeros(3, 8, 8), lambda caps: torch.zeros(len(caps), 4, dtype=torch.long),
                          rank=0, world_size=1)
    assert sum(len(images) for images, _ in loader) == 8


def test_cpu_training_console_holds_no_library_chatter_and_shows_progress(tmp_path):
    # a whole run (so DeepSpeed and its CPU ops were imported, where the chatter came from): none of it printed
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "run2"), "train.steps=3", "train.progress=false"],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    console = r.stdout + r.stderr
    assert "No CUDA runtime is found" not in console
    assert "built successfully" not in console
    # no bar without a terminal, but the last step's plain line with loss, rate and ETA
    assert "step 3/3  loss " in r.stderr and "samples/s  ETA" in r.stderr


def test_wandb_offline_logs_the_metrics_rows(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "train.steps=3", "train.report_to=[wandb]"],
                       env={**ENV, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert not (out / "tensorboard").exists()  # report_to lists wandb alone


def test_zeroshot_eval_prints_the_headline_once(tmp_path, capsys):
    from helpers import write_wds

    from zeroshot.cli import main

    write_wds(tmp_path / "mnist", [str(i) for i in range(10)], [i % 10 for i in range(12)], shards=1, ext="png")
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "mnist", "--root", str(tmp_path / "mnist"),
                 "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mnist:"))
    assert line.count("top1=") == 1, line
