"""No host reads of device values between logging steps (#18): on a GPU each one stalls the CPU until the device
drains its queue, so the loop keeps the loss, its finiteness and its metrics on the device.

`host_sync_probe.py` trains 9 steps (logging every 4th) with `Tensor.item`, `.tolist`, `.cpu`, `.numpy` and the
Python number conversions recorded per optimizer step. Steps 4, 8 and 9 log and may read; the others must not.
"""

import json
import subprocess
import sys

import pytest
from helpers import ENV, REPO

PROBE = str(REPO / "tests" / "host_sync_probe.py")
QUIET = (1, 2, 3, 5, 6, 7)


def probe(tmp_path, *overrides):
    r = subprocess.run([sys.executable, PROBE, str(tmp_path / "run"), *overrides], env=ENV, capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["logged"] == [4, 8, 9]
    return {int(step): sites for step, sites in got["calls"].items()}


@pytest.mark.parametrize("overrides", [
    (),  # the default: fp32, ZeRO 0, one micro-batch
    ("train.grad_accum=2",),  # exact accumulation: the cached-feature loss and two replays
    # routing and its statistics, with independent micro-batches (a skip flag over two micro-steps)
    ("model.moe.num_experts=4", "model.moe.towers=both", "train.grad_accum=2", "train.accumulation=independent"),
], ids=["default", "exact", "moe-independent"])
def test_no_host_read_between_logging_steps(tmp_path, overrides):
    calls = probe(tmp_path, *overrides)
    assert {step: calls[step] for step in QUIET if calls.get(step)} == {}
    # the probe does see reads: the logging steps make them (the window's loss and counters, the metrics)
    assert any("vlpretrain/guard.py" in site for site in calls[4])


def test_no_host_read_of_ours_under_deepspeeds_bf16_optimizer(tmp_path):
    """DeepSpeed's ZeRO optimizers check the gradient norm on the host once per optimizer step (its own code,
    counted for each ZeRO stage by benchmarks/host_syncs.py); nothing of ours may add to it."""
    calls = probe(tmp_path, "train.precision=bf16")
    ours = {step: [s for s in calls.get(step, []) if "vlpretrain/" in s] for step in QUIET}
    assert {step: sites for step, sites in ours.items() if sites} == {}
    # bf16 runs DeepSpeed's BF16_Optimizer (ZeRO 1): its norm check and clip read 2 values per step, where the
    # stage-0 bf16 path read one per parameter tensor (86 for this model)
    assert all(len(calls.get(step, [])) <= 2 for step in QUIET), {s: calls.get(s) for s in QUIET}


def test_bf16_runs_deepspeeds_bf16_optimizer():
    from vlpretrain.config import load_config
    from vlpretrain.engine import deepspeed_config

    def ds(*overrides):
        return deepspeed_config(load_config(None, ["data.train=unused", *overrides]), world_size=1)

    bf16 = ds("train.precision=bf16")
    assert bf16["zero_optimization"]["stage"] == 1 and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds("train.precision=bf16", "train.zero_stage=2")["zero_optimization"]["stage"] == 2
    fp32 = ds()
    assert fp32["zero_optimization"]["stage"] == 0 and "data_types" not in fp32
    assert fp32["optimizer"]["params"]["fused"] is True  # the fused AdamW that reads the device skip flag
