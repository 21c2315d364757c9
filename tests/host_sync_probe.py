"""Train a few steps with every host read of a tensor recorded, per optimizer step (for tests/test_host_sync.py).

usage: python tests/host_sync_probe.py OUT_DIR [k=v ...]; prints one JSON object: {"calls": {step: [site, ...]},
"logged": [steps that wrote a metrics row], "device_syncs": {step: [site, ...]}}. A site is "method file:line"; step
s holds the calls made after step s - 1 finished and up to the end of step s. On a GPU each of these reads waits
for the device to drain its queue; there the probe also turns on torch.cuda's sync debug mode and records every
synchronising CUDA call per step ("device_syncs"), whoever makes it (DeepSpeed included).
"""

import collections
import json
import sys
import traceback
import warnings

import torch

from vlpretrain import logger
from vlpretrain.config import load_config
from vlpretrain.data import EpochBatches
from vlpretrain.trainer import train

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
calls: dict[int, list[str]] = collections.defaultdict(list)
device_syncs: dict[int, list[str]] = collections.defaultdict(list)
step = [0]  # the step being run; 0 = before the loop


def _record(name: str):
    original = getattr(torch.Tensor, name)

    def recorded(self, *args, **kwargs):
        if step[0] > 0:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            site = frames[-1] if frames else traceback.extract_stack()[-2]
            path = site.filename.split("site-packages/")[-1].split("/work/")[-1]
            calls[step[0]].append(f"{name} {path}:{site.lineno}")
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, recorded)


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, ["data.train=unused", f"train.output_dir={out}", "data.batch_size=4",
                             "train.progress=false", "train.log_every=4", "train.steps=9", "train.warmup_steps=2",
                             "train.save_every=0", "eval.at_end=false", *overrides])
    logged: list[int] = []
    advance, log = logger.MetricsLogger.advance, logger.MetricsLogger.log

    cuda = torch.cuda.is_available()

    def on_advance(self):
        step[0] += 1  # the loop calls advance once per optimizer step, after its logging
        return advance(self)

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if step[0] > 0 and "synchroniz" in str(message):
            path = filename.split("site-packages/")[-1].split("/work/")[-1]
            device_syncs[step[0]].append(f"{path}:{lineno}")

    def on_log(self, row):
        logged.append(row["step"])
        return log(self, row)

    logger.MetricsLogger.advance, logger.MetricsLogger.log = on_advance, on_log

    def data(epoch: int, start: int):
        for b in range(start, 5):
            step[0] = max(step[0], 1)  # the loop's first batch: recording starts
            g = torch.Generator().manual_seed(epoch * 100 + b)
            yield torch.randn(4, 3, 28, 28, generator=g), torch.randint(1, 49000, (4, 16), generator=g)

    for name in HOST_READS:
        _record(name)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = on_warning
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        train(cfg, data=EpochBatches(data), overwrite=True)
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    step[0] = 0
    print(json.dumps({"calls": calls, "logged": logged, "device_syncs": device_syncs}))


if __name__ == "__main__":
    main()
