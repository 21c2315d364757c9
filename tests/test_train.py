"""The trainer under DeepSpeed: ZeRO stages agree, resume is exact, kills and signals lose nothing, export loads."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import ENV, REPO, SCRIPT, losses, run

from vlpretrain.models import load_model, load_state_dict, register_model_configs


def test_single_process_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    run(out, "train.steps=4", "train.save_every=2", "train.keep_last=1")
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["steps"] == 4 and s["samples"] == 16 and not s["interrupted"]
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004"]  # keep_last=1 pruned step 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
def test_zero_stages_same_fp32_trajectory(tmp_path):
    traj = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path / f"z{stage}"
        # independent micro-batches, as this test was written for; exact accumulation across stages is in
        # test_accumulate.py and test_lock.py (Adam's eps-level sensitivity needs its own tolerance there)
        run(out, "train.steps=5", f"train.zero_stage={stage}", "train.grad_accum=2", "train.accumulation=independent",
            nproc=2)
        traj[stage] = losses(out)
    assert sorted(traj[0]) == [1, 2, 3, 4, 5]
    ref = np.array([traj[0][k] for k in sorted(traj[0])])
    for stage in (1, 2, 3):
        got = np.array([traj[stage][k] for k in sorted(traj[stage])])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=f"ZeRO-{stage} differs from ZeRO-0")
    assert ref[-1] != ref[0]  # training moved
    # the exported consolidated weights agree across stages too
    w0 = load_state_dict(tmp_path / "z0" / "checkpoints" / "step_00000005" / "model.safetensors")
    for stage in (1, 2, 3):
        w = load_state_dict(tmp_path / f"z{stage}" / "checkpoints" / "step_00000005" / "model.safetensors")
        assert w.keys() == w0.keys()
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=1e-5, msg=f"ZeRO-{stage} {k}")


def test_resume_equals_straight_run(tmp_path):
    common = ["train.steps=8", "train.warmup_steps=3"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "split", *common, "train.stop_after=4", check=False)
    first = json.loads((tmp_path / "split" / "summary_rank0.json").read_text())
    assert first["steps"] == 4 and first["interrupted"]
    run(tmp_path / "split", *common, extra=["--resume", "latest"])
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    s = json.loads((tmp_path / "split" / "summary_rank0.json").read_text())
    assert s["samples"] == 32  # the data position continued: 8 steps x 4 samples, nothing replayed


def test_grad_checkpointing_matches_eager(tmp_path):
    """model.grad_checkpointing changes memory, not the maths. (model.compile is checked against one big batch in
    test_accumulate.py, compiled with exact accumulation: one compile covers both.)"""
    common = ["train.steps=3", "train.warmup_steps=1"]
    run(tmp_path / "eager", *common)
    run(tmp_path / "ckpt", *common, "model.grad_checkpointing=true")
    ref = losses(tmp_path / "eager")
    assert sorted(ref) == [1, 2, 3] and ref[3] != ref[1]
    got = losses(tmp_path / "ckpt")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step


def _weights(out, step):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_losses_skip_the_update_on_the_device(tmp_path):
    """A non-finite loss makes its optimizer step leave weights and optimizer state untouched (decided on the
    device, no host read); the step still counts, and the logged loss of that step is NaN."""
    out = tmp_path / "skip"
    run(out, "train.steps=5", "train.save_every=1", "train.keep_last=5", extra=["--nan-batches", "1,2"])
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["steps"] == 5 and s["nonfinite_skipped"] == 2 and s["samples"] == 20  # batches 1, 2 = steps 2, 3
    got = losses(out)
    assert np.isnan(got[2]) and np.isnan(got[3]) and all(np.isfinite(got[k]) for k in (1, 4, 5))
    # keep_last=5 keeps all five (a negative slice once pruned every checkpoint but the newest two)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{i:08d}" for i in range(1, 6)]
    w = {step: _weights(out, step) for step in range(1, 6)}
    assert _same(w[1], w[2]) and _same(w[2], w[3])  # bit-identical through the skipped steps
    assert not _same(w[3], w[4]) and all(torch.isfinite(v).all() for v in w[5].values())
    # and so is the optimizer state: Adam's step count and both moments
    from vlpretrain.engine.checkpoint import safe_torch_load

    opt = {step: safe_torch_load(out / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt")
           ["optimizer"]["state"] for step in (1, 3, 4)}
    assert all(torch.equal(opt[1][i][k], opt[3][i][k]) for i in opt[1] for k in opt[1][i])
    assert opt[3][0]["step"].item() == 1 and opt[4][0]["step"].item() == 2


def test_logged_loss_is_the_mean_since_the_previous_row(tmp_path):
    """A row's loss is the mean of every step's loss since the previous row, summed on the device; a checkpoint
    step in between (a sync step too) does not cut the window short."""
    run(tmp_path / "every", "train.steps=4", "train.save_every=0")
    run(tmp_path / "window", "train.steps=4", "train.log_every=4", "train.save_every=2")
    each, window = losses(tmp_path / "every"), losses(tmp_path / "window")
    assert sorted(window) == [4]
    assert window[4] == pytest.approx(sum(each.values()) / 4, rel=1e-6)


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    out = tmp_path / "stop"
    r = run(out, "train.steps=6", "train.save_every=1", "train.keep_last=6", "train.max_nonfinite=3", check=False,
            extra=["--nan-batches", "2,3,4,5,6"])
    assert r.returncode == 2
    # batches 2, 3, 4 are steps 3, 4, 5: the third in a row stops the run before step 5 is saved
    assert "3 non-finite losses in a row by step 5" in r.stderr
    assert "step_00000004" in r.stderr  # names the last checkpoint, which stays latest
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert _same(_weights(out, 4), _weights(out, 2))  # whose weights are the last good ones


def test_nonfinite_detected_on_the_next_sync_step(tmp_path):
    """Between logging steps the host never reads the loss: a run of non-finite losses is noticed on the next
    sync step, however the run ended, and the count of skipped steps is exact."""
    out = tmp_path / "late"
    r = run(out, "train.steps=8", "train.log_every=4", "train.max_nonfinite=2", check=False,
            extra=["--nan-batches", "1,2"])
    assert r.returncode == 2 and "2 non-finite losses in a row by step 4" in r.stderr, r.stderr[-2000:]
    out = tmp_path / "tolerated"
    run(out, "train.steps=8", "train.log_every=4", "train.max_nonfinite=3", extra=["--nan-batches", "1,2,5"])
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["steps"] == 8 and s["nonfinite_skipped"] == 3
    assert all(np.isfinite(v) for v in losses(out).values())  # the logged loss: the window's finite losses


def _wait_for(path: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_resumes_from_intact_latest(tmp_path):
    """A killed run leaves a complete latest checkpoint, and its folder's lock free: `--resume latest` goes on."""
    out = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, str(out), "--slow", "0.2", "train.steps=1000", "train.save_every=2"]
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoints" / "step_00000004" / "COMPLETE")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((out / ".vlpretrain.lock").read_text())["pid"] == p.pid  # it held the folder; the OS let go
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 4 and (out / "checkpoints" / latest / "COMPLETE").is_file()
    run(out, f"train.steps={step + 2}", "train.save_every=2", extra=["--resume", "latest"])
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["steps"] == step + 2 and not s["interrupted"]
    assert min(k for k in losses(out) if k > step) == step + 1


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, SCRIPT, str(out), "--slow", "0.2", "train.steps=1000"]
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl")
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["interrupted"] and 0 < s["steps"] < 1000
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{s['steps']:08d}"


def test_export_loads_in_open_clip(tmp_path):
    out = tmp_path / "exp"
    run(out, "train.steps=2")
    target = tmp_path / "model.safetensors"
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "export", str(out), str(target)],
                       env=ENV, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    register_model_configs()
    ref = open_clip.create_model("tiny-vit", pretrained=str(target)).eval()
    ours = load_model(str(target)).eval()
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer("tiny-vit")(["a photo of a bag", "a sandal", "a coat"])
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(images), ours.encode_image(images))
        torch.testing.assert_close(ref.encode_text(text), ours.encode_text(text))
    trained = load_state_dict(out / "checkpoints" / "step_00000002" / "model.safetensors")
    torch.testing.assert_close(ref.state_dict()["visual.conv1.weight"], trained["visual.conv1.weight"])
    assert not torch.equal(trained["visual.conv1.weight"],
                           open_clip.create_model("tiny-vit").state_dict()["visual.conv1.weight"])


def test_data_samples_counts_what_the_steps_took(tmp_path):
    """`data/samples` in every metrics row of a run on shards is steps x batch x ranks: the loader counted batches as
    they left it, and the trainer's DevicePrefetch holds the next step's micro-batches (16 logged after 8 trained
    with 2 micro-batches of 4) (#23.9c)."""
    from PIL import Image

    from vlpretrain.data import write_shards

    src = tmp_path / "src"
    src.mkdir()
    for i in range(48):
        Image.new("RGB", (32, 32), (i * 5, 0, 7)).save(src / f"{i:05d}.png")
        (src / f"{i:05d}.txt").write_text(f"photo {i}")
    write_shards(src, tmp_path / "shards", "folder", shard_size=16, progress=False)
    out = tmp_path / "run"

    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                        f"--set=data.train={tmp_path}/shards/*.tar", "--set=data.batch_size=4", "--set=data.workers=0",
                        "--set=train.grad_accum=2", "--set=train.steps=3", "--set=train.log_every=1",
                        "--set=train.warmup_steps=1", "--set=train.progress=false", "--set=eval.benchmarks=[]",
                        "--set=eval.linear_probe=false", f"--set=train.output_dir={out}", "--set=train.zero_stage=0"],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["data/samples"]) for r in rows if "loss" in r] == [(1, 8), (2, 16), (3, 24)]
