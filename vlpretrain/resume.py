"""Resuming at another world size (a job moved from 2 processes to 1, or from 8 GPUs to 16): the rules, pure, and
the conversion of a ZeRO 1-2 checkpoint that they may call for.

A checkpoint records the world size it was saved at, beside its config (data.batch_size, train.grad_accum). The
contrastive loss of a step is over its global batch (batch size x micro-steps x processes), so a resume at another
world size keeps that global batch by changing train.grad_accum, and maps the data position by samples consumed.
Under ZeRO-0 every process holds the whole model and optimizer state, so the state loads as it is. ZeRO 1-2 split
the optimizer state by process: fp32 runs (optimizer on the device) are converted to DeepSpeed's universal
checkpoint, which loads at any world size. ZeRO-3 (weights split too), bf16 under ZeRO 0-2 (DeepSpeed's
BF16_Optimizer), an offloaded optimizer and DeepSpeed's MoE (experts split by process) are refused with what to do
instead: those conversions are untested here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from vlpretrain.config import RunConfig
from vlpretrain.engine.checkpoint import to_universal
from vlpretrain.engine.core import zero_stage_run
from vlpretrain.engine.dist import DistEnv
from vlpretrain.errors import CheckpointError, ConfigError


def saved_world_size(client: dict[str, Any], path: Path) -> int:
    """The number of processes that wrote the checkpoint: stored since issue 23; for older checkpoints, one
    optimizer shard per process (ZeRO 1-3), else the samples per optimizer step over the batch per process."""
    if "world_size" in client:
        return int(client["world_size"])
    shards = len(list(path.glob("*zero_pp_rank_*_optim_states.pt")))
    if shards:
        return shards
    state, saved = client["train_state"], client["config"]
    per_process = saved["data"]["batch_size"] * saved["train"]["grad_accum"]
    return max(1, round(state["samples"] / max(state["step"], 1) / per_process))


class WorldChange(NamedTuple):
    """How a resume meets the checkpoint's world size: the config to run (train.grad_accum adjusted), the world
    size it was saved at, what changed (None when nothing did), and whether to load through a universal
    checkpoint."""

    cfg: RunConfig
    saved_world: int
    note: str | None
    universal: bool


def adapt_to_world_size(client: dict[str, Any], cfg: RunConfig, world_size: int, path: Path) -> WorldChange:
    """The train.grad_accum that keeps the checkpoint's global batch at `world_size`, and how its state loads.
    Raises CheckpointError where the state cannot move to another world size, ConfigError where no whole
    train.grad_accum keeps the global batch."""
    old = saved_world_size(client, path)
    saved = client["config"]
    batch, accum = saved["data"]["batch_size"], saved["train"]["grad_accum"]
    if old == world_size:
        return WorldChange(cfg, old, None, False)
    what = f"{path}: saved by {old} process(es), resumed with {world_size}"
    weights = f"--set model.pretrained={path / 'model.safetensors'}"
    t, stage = cfg.train, zero_stage_run(cfg.train)
    if stage == 3 or (stage > 0 and (t.precision == "bf16" or t.offload_optimizer)):
        kind = f"ZeRO-{stage}" + (" bf16" if t.precision == "bf16" else "") + (" offloaded" if t.offload_optimizer
                                                                               else "")
        raise CheckpointError(f"{what}; {kind} state is split by process and moves to another world size only "
                              f"under ZeRO-0, or fp32 ZeRO 1-2 on the device: resume with {old} process(es), or start "
                              f"a new run from its weights ({weights}; the optimizer state starts afresh)")
    if cfg.model.moe.num_experts and cfg.model.moe.backend == "deepspeed":
        raise CheckpointError(f"{what}; DeepSpeed's MoE saves experts by process: resume with {old} process(es), "
                              f"or use model.moe.backend native, or start a new run from its weights ({weights})")
    global_batch = batch * accum * old
    if global_batch % (batch * world_size):
        raise ConfigError(f"{what}; its global batch of {global_batch} (data.batch_size {batch} x train.grad_accum "
                          f"{accum} x {old}) needs a whole train.grad_accum: resume with a number of processes that "
                          f"divides {global_batch // batch}")
    need = global_batch // (batch * world_size)
    if cfg.train.grad_accum not in (accum, need):
        raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} would change the global batch of "
                          f"{global_batch} of the checkpoint {path}; with {world_size} process(es) it must be {need} "
                          f"(left unset, it is)")
    cfg = replace(cfg, train=replace(cfg.train, grad_accum=need))
    how = f" (ZeRO-{stage} state loaded through DeepSpeed's universal checkpoint)" if stage else ""
    return WorldChange(cfg, old, f"world size {old} -> {world_size}: train.grad_accum {accum} -> {need} keeps the "
                                 f"global batch of {global_batch}{how}", stage > 0)


def map_data_position(batch_in_epoch: int, old: int, new: int, batch_size: int) -> tuple[int, str]:
    """The batch per process of the epoch to resume at under `new` processes after `batch_in_epoch` batches per
    process under `old`: the same samples consumed, rounded down (those beyond it are read again), and how exactly."""
    consumed = batch_in_epoch * old * batch_size
    start = consumed // (new * batch_size)
    again = consumed - start * new * batch_size
    exact = "exact" if not again else f"{again} sample(s) of it read again"
    return start, f"{consumed} samples of the epoch consumed -> batch {start} per process ({exact})"


def universal_copy(path: Path, out_dir: Path, env: DistEnv) -> Path:
    """`path` converted by rank 0 into a universal checkpoint in the run folder's checkpoints folder, which every
    rank then loads (and rank 0 removes); a failed conversion stops every rank with the same line."""
    dest = out_dir / "checkpoints" / f".universal-{path.name}"
    error = None
    if env.is_main:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            to_universal(path, dest)
        except CheckpointError as e:
            error = str(e)
    error = env.share(error)
    if error:
        raise CheckpointError(error)
    return dest
