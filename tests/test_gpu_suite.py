"""benchmarks/gpu_suite.sh end to end in its dry mode (CPU, tiny model), so the one-call GPU check never rots."""

import os
import subprocess

import pytest
from helpers import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_suite_dry_run_prints_every_figure():
    env = subprocess_env()
    env["PYTHON"] = os.environ.get("PYTHON", __import__("sys").executable)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry"], env=env, capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout
    for needle in ("== environment", "open_clip_train :", "vlpretrain      :", "ratio           :",
                   "peak memory     :", "== objective step time", "ratio HF / open_clip: step", "== gpu_suite done"):
        assert needle in out, needle
    ratio = float(out.split("ratio           :")[1].split("x")[0])
    assert ratio > 0
    # the host-read table: none of ours between logging steps
    row = next(line for line in out.splitlines() if line.startswith("fp32 ZeRO-0"))
    assert float(row.split()[2]) == 0.0, row
    # the objectives table: every mode at grad_accum 1 and 2, with its step time and ratio against clip
    table = out.split("== objective step time")[1].split("\n==")[0]
    modes = ("clip", "distill", "coca", "clip@coca")
    rows = {(cells[0], cells[1]): cells for cells in map(str.split, table.splitlines()) if cells[:1] and cells[0] in modes}
    assert set(rows) == {(m, k) for m in modes for k in ("1", "2")}, table
    for (mode, _), row in rows.items():
        assert float(row[2]) > 0 and float(row[4].rstrip("x")) > 0, row
        assert mode != "clip" or row[4] == "1.00x", row
