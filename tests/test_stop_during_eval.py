"""SIGINT/SIGTERM during an evaluation (issue #23.5): honoured within seconds, not after the evaluation; what changed
is checkpointed, the results file says what was cut, and a second signal exits at once.

The long evaluation is a real one: MNIST-format idx files of many random images, read one per batch, after a small
benchmark whose progress line tells the test that evaluation has started.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SCRIPT, free_port, subprocess_env, write_idx

from vlpretrain.config import ModelConfig
from vlpretrain.models import build_model, export_model

ENV = subprocess_env()
LONG = 30_000  # images of the long benchmark: minutes at one image per batch, against seconds to stop


def eval_root(root: Path, splits: tuple[str, ...] = ("test",)) -> Path:
    """fashion-mnist with 16 images (quick) and mnist with LONG images (long), in idx files under one root."""
    rng = np.random.default_rng(0)
    for name, n in (("fashion-mnist", 16), ("mnist", LONG)):
        for split in splits:
            k = n if split == "test" else 20
            prefix = {"test": "t10k", "train": "train"}[split]
            write_idx(root / name / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (k, 28, 28), dtype=np.uint8))
            write_idx(root / name / f"{prefix}-labels-idx1-ubyte", (np.arange(k) % 10).astype(np.uint8))
    return root


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    out = log.with_suffix(".out")
    with open(log, "w") as err, open(out, "w") as std:
        # its own process group, so that `end` also reaches torchrun's workers
        return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=std, stderr=err, text=True,
                                start_new_session=True), out


def end(p: subprocess.Popen) -> None:
    """Kill whatever is left of the process and its children (after a failure)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def wait_for_line(p: subprocess.Popen, file: Path, pattern: str, timeout: float = 300) -> re.Match:
    """The first match of `pattern` in `file` once the process wrote it (the process must still be running)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        m = re.search(pattern, file.read_text())
        if m:
            return m
        assert p.poll() is None, f"exited {p.returncode} first:\n{file.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {file}")


def stop_after_first_benchmark(p: subprocess.Popen, log: Path, sig: int, pid: int | None = None) -> float:
    """Send `sig` (to `pid`, default the process) once the quick benchmark is done and the long one under way;
    returns the seconds until the process ended, after checking that the long benchmark would have taken far
    longer at the quick one's rate."""
    try:
        rate = float(wait_for_line(p, log, r"fashion-mnist: 16 img in [\d.]+ s, ([\d.]+) img/s").group(1))
        sent = time.monotonic()
        os.kill(pid or p.pid, sig)
        p.wait(timeout=120)  # a bound, not the check: the code before the fix evaluated for minutes
        seconds = time.monotonic() - sent
    finally:
        end(p)
    assert seconds < 30 and seconds < LONG / rate / 3, (seconds, LONG / rate)
    return seconds


def checkpoints(out: Path) -> list[str]:
    return sorted(q.name for q in (out / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_sigterm_during_periodic_then_final_evaluation(tmp_path):
    """At eval.every: the step's state was not checkpointed, so SIGTERM writes that checkpoint and exits 130. The
    resumed run's final evaluation: the final checkpoint exists, SIGTERM cuts the evaluation, results.json keeps
    the finished benchmark and lists what was not evaluated."""
    root, out = eval_root(tmp_path / "bench", ("test", "train")), tmp_path / "run"
    settings = ["train.steps=4", "eval.every=2", "eval.benchmarks=[fashion-mnist,mnist]", f"eval.root={root}",
                "eval.batch_size=1", "eval.linear_probe=true"]
    p, _ = start([sys.executable, SCRIPT, str(out), *settings], tmp_path / "periodic.log")
    stop_after_first_benchmark(p, tmp_path / "periodic.log", signal.SIGTERM)
    err = (tmp_path / "periodic.log").read_text()
    assert p.returncode == 130, err[-3000:]
    assert "stop requested during the evaluation at step 2" in err and "Traceback" not in err
    assert checkpoints(out) == ["step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert json.loads((out / "summary_rank0.json").read_text())["interrupted"]
    assert not (out / "results.json").exists()  # periodic evaluations write none

    p, std = start([sys.executable, SCRIPT, str(out), *settings, "--resume", "latest"], tmp_path / "final.log")
    stop_after_first_benchmark(p, tmp_path / "final.log", signal.SIGTERM)
    err = (tmp_path / "final.log").read_text()
    assert p.returncode == 130, err[-3000:]
    assert "resumed from" in std.read_text() and "at step 2" in std.read_text()
    assert "stop requested during the final evaluation" in err and "Traceback" not in err
    assert checkpoints(out) == ["step_00000002", "step_00000004"]  # the final one, and no other
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert (out / "model.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["benchmark"]) for r in results["results"]] == [("zeroshot", "fashion-mnist")]
    assert results["interrupted"]["not_evaluated"] == [{"task": "zeroshot", "benchmark": "mnist"},
                                                       {"task": "linear_probe", "benchmark": "fashion-mnist"},
                                                       {"task": "linear_probe", "benchmark": "mnist"}]
    assert results["training"]["steps"] == 4
    s = json.loads((out / "summary_rank0.json").read_text())
    assert s["interrupted"] and s["steps"] == 4


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank`."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_sigterm_to_a_waiting_rank_stops_rank_0s_evaluation(tmp_path):
    """Two processes: rank 0 evaluates alone while rank 1 waits; SIGTERM to rank 1 only reaches rank 0 within a
    batch, and both checkpoint the step and stop (neither hangs in a collective). torchrun then ends the rank still
    exiting when the first exits 130, and prints its own traceback for that."""
    root, out = eval_root(tmp_path / "bench"), tmp_path / "run"
    p, _ = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  SCRIPT, str(out), "train.steps=4", "eval.every=2", "eval.benchmarks=[fashion-mnist,mnist]",
                  f"eval.root={root}", "eval.batch_size=1"], tmp_path / "err.log")
    try:
        wait_for_line(p, tmp_path / "err.log", r"fashion-mnist: 16 img in")  # workers are up, rank 0 evaluating
        stop_after_first_benchmark(p, tmp_path / "err.log", signal.SIGTERM, pid=rank_pid(p, 1))
    finally:
        end(p)
    err = (tmp_path / "err.log").read_text()
    assert err.count("stop requested during the evaluation at step 2: evaluation cut short") == 2, err[-3000:]
    assert err.count(f"stop requested: checkpoint {out}/checkpoints/step_00000002 written, exiting") == 2
    # whichever rank exits first does so with 130; torchrun then ends the other one
    assert re.search(r"rank\s*: [01] \(local_rank: [01]\)\s*exitcode\s*: 130 ", err), err[-3000:]
    assert checkpoints(out) == ["step_00000002"]
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM asks for a stop the run cannot reach (its data never comes); the same signal repeated at
    once (a launcher forwarding what the terminal sent) counts as one; a second a while later exits now, 130."""
    out, go = tmp_path / "run", tmp_path / "go"
    p, _ = start([sys.executable, SCRIPT, str(out), "--hold-until", str(go), "train.steps=2"], tmp_path / "err.log")
    try:
        give_up = time.monotonic() + 300
        while not Path(f"{go}.waiting").exists():
            assert p.poll() is None and time.monotonic() < give_up, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGTERM)
        time.sleep(2.0)  # past the window in which a repeat is the same request
        assert p.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)  # at once; the code before the fix waited for its data forever
    finally:
        end(p)
    err = (tmp_path / "err.log").read_text()
    assert p.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == "SIGTERM again: exiting now", err[-3000:]
    assert checkpoints(out) == [] and "Traceback" not in err


def test_zeroshot_eval_ctrl_c_keeps_what_finished(tmp_path):
    """`zeroshot eval`: Ctrl-C during the long benchmark prints one line, writes the finished one and lists the other
    as not evaluated, exits 130 without a traceback, within seconds."""
    root = eval_root(tmp_path / "bench")
    model = export_model(build_model(ModelConfig(name="tiny-vit")), ModelConfig(name="tiny-vit"),
                         tmp_path / "model.safetensors")
    res = tmp_path / "results.json"
    p, std = start([sys.executable, "-m", "zeroshot.cli", "eval", "--model", str(model), "--benchmark",
                    "fashion-mnist,mnist", "--root", str(root), "--out", str(res), "--batch-size", "1"],
                   tmp_path / "err.log")
    stop_after_first_benchmark(p, tmp_path / "err.log", signal.SIGINT)
    err = (tmp_path / "err.log").read_text()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        f"interrupted: 1 of 2 benchmarks evaluated; {res} lists the others as not evaluated"]
    assert "fashion-mnist: top1=" in std.read_text()
    results = json.loads(res.read_text())
    assert [(r["task"], r["benchmark"]) for r in results["results"]] == [("zeroshot", "fashion-mnist")]
    assert results["interrupted"]["not_evaluated"] == [{"task": "zeroshot", "benchmark": "mnist"}]
