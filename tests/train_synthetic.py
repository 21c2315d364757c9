"""Run `vlpretrain.train` on deterministic synthetic batches (used by the trainer tests, one or more processes).

usage: python tests/train_synthetic.py OUT_DIR [--nan-batches 3,4] [--slow SECONDS] [--hold-until FILE]
    [--resume latest] [--per-sample] [--global-order] [--image-size 28] [--context 16] [k=v ...]

--hold-until makes the first batch wait until FILE exists; FILE.waiting appears when the wait begins.
--per-sample draws every sample from its own seed, in epochs of SAMPLES_PER_EPOCH samples per rank, so that k
micro-batches of b hold exactly the samples of one batch of k x b (the accumulation tests compare the two).
--global-order draws batches from one sequence of GLOBAL_BATCHES_PER_EPOCH per epoch, rank r of w taking every
w-th from r on: the samples of a step are the same at any world size with the same global batch.
"""

import argparse
import json
import os
import sys
import time

import torch

from vlpretrain.config import load_config
from vlpretrain.console import print_error
from vlpretrain.data import EpochBatches
from vlpretrain.engine.launch import launch_env
from vlpretrain.errors import VLPretrainError
from vlpretrain.trainer import train

BATCHES_PER_EPOCH = 5
SAMPLES_PER_EPOCH = 48
GLOBAL_BATCHES_PER_EPOCH = 10


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--nan-batches", default="")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--hold-until", help="the first batch waits until this file exists (the run folder is locked)")
    p.add_argument("--resume", default=None)
    p.add_argument("--per-sample", action="store_true")
    p.add_argument("--global-order", action="store_true")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--context", type=int, default=16, help="tokens per caption (the model's context length)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    try:
        cfg = load_config(None, ["data.train=unused", f"train.output_dir={a.out}", "data.batch_size=4",
                                 "train.progress=false", "train.log_every=1", "train.warmup_steps=2",
                                 "train.lr=1e-3", *a.overrides])
        place = launch_env(os.environ)  # any launcher: torchrun, srun, mpirun or none
        rank, world = place.rank, place.world_size
    except VLPretrainError as e:  # as the CLI does: one line, exit 2
        print_error(str(e))  # as the CLI does
        sys.exit(2)
    nan = {int(x) for x in a.nan_batches.split(",") if x}
    bs = cfg.data.batch_size

    def data(epoch: int, start: int):
        if a.hold_until and not os.path.exists(a.hold_until):
            open(a.hold_until + ".waiting", "w").close()  # tells a test that the run got this far
        while a.hold_until and not os.path.exists(a.hold_until):
            time.sleep(0.1)
        for b in range(start, BATCHES_PER_EPOCH):
            g = torch.Generator().manual_seed(((epoch * 100 + b) * 8 + rank) * 7919)
            images = torch.randn(bs, 3, a.image_size, a.image_size, generator=g)
            if epoch * BATCHES_PER_EPOCH + b in nan:
                images[:] = float("nan")
            if a.slow:
                time.sleep(a.slow)
            yield images, torch.randint(1, 49000, (bs, a.context), generator=g)

    def sample(epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(((epoch * 1000 + i) * 8 + rank) * 7919)
        return torch.randn(3, a.image_size, a.image_size, generator=g), torch.randint(1, 49000, (a.context,), generator=g)

    def per_sample(epoch: int, start: int):
        for b in range(start, SAMPLES_PER_EPOCH // bs):
            images, texts = zip(*(sample(epoch, i) for i in range(b * bs, (b + 1) * bs)))
            images = torch.stack(images)
            if epoch * (SAMPLES_PER_EPOCH // bs) + b in nan:
                images[:] = float("nan")
            yield images, torch.stack(texts)

    def global_order(epoch: int, start: int):
        for b in range(start, GLOBAL_BATCHES_PER_EPOCH // world):
            g = torch.Generator().manual_seed((epoch * 100 + b * world + rank) * 7919 + 13)
            yield (torch.randn(bs, 3, a.image_size, a.image_size, generator=g),
                   torch.randint(1, 49000, (bs, a.context), generator=g))

    source = per_sample if a.per_sample else global_order if a.global_order else data
    try:
        summary = train(cfg, resume=a.resume, data=EpochBatches(source))
    except VLPretrainError as e:
        print_error(str(e))  # as the CLI does
        sys.exit(2)
    with open(os.path.join(a.out, f"summary_rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    sys.exit(0 if not summary["interrupted"] else 130)


if __name__ == "__main__":
    main()
