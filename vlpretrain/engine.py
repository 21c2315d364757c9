"""DeepSpeed wrapping, and the only module that imports DeepSpeed.

A plain model goes in; an engine comes out that does backward, step, ZeRO partitioning, precision and gradient
accumulation, and saves or loads its state. Models and losses never know which engine runs them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpretrain.config import RunConfig, TrainConfig
from vlpretrain.errors import CheckpointError, ConfigError


@dataclass
class DistEnv:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or create) the process group from the launcher's environment: torchrun, deepspeed, or a lone process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # a lone process: a one-member group so every code path is the distributed one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("VLPRETRAIN_DIST_TIMEOUT_MIN", "30")))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def shutdown_distributed() -> None:
    """Destroy the process group before exit (avoids an abort seen at exit after ZeRO-3 bf16 runs)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms, embeddings, the temperature and other 0/1-d tensors are not decayed."""
    keywords = ("bias", "norm", "ln_", "bn", "embedding", "logit_scale", "logit_bias", "class_embedding", "token_")
    return p.ndim < 2 or any(k in name for k in keywords)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict derived from the run config (there is no separate DeepSpeed JSON to keep in step)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        if t.zero_stage == 0:
            raise ConfigError("train.offload_optimizer: needs train.zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            # torch's fused AdamW (CPU and GPU): one kernel over all tensors instead of a loop per parameter
            "torch_adam": not t.offload_optimizer, **({} if t.offload_optimizer else {"fused": True})}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, cfg: RunConfig, env: DistEnv):
    """Wrap `model` in a DeepSpeed engine with our parameter groups and warmup-cosine schedule."""
    import deepspeed

    if cfg.model.moe.num_experts > 0:
        from vlpretrain.models.moe import check_moe_engine_compat, moe_param_groups

        check_moe_engine_compat(cfg.model.moe, cfg.train.zero_stage)
        groups = moe_param_groups(param_groups(model, cfg.train.weight_decay))
    else:
        groups = param_groups(model, cfg.train.weight_decay)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg.train) / cfg.train.lr)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(cfg, env.world_size), lr_scheduler=schedule)
    if env.world_size == 1 and cfg.train.zero_stage == 0:
        # averaging gradients over one rank is the identity; DeepSpeed would still flatten and copy them every step
        engine.enable_backward_allreduce = False
    return engine


def consolidated_state_dict(engine, moe: bool = False) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (None elsewhere), from any ZeRO stage; collective under ZeRO-3 and for MoE
    experts split across ranks. MoE weights come out in the one file format both backends load."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    elif moe:
        from vlpretrain.models.moe import export_state_dict

        state = export_state_dict(engine.module)  # every rank: gathers expert-parallel experts
        state = state if torch.distributed.get_rank() == 0 else None
    else:
        state = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    if state is None:
        return None
    return {k: v.detach().float().cpu() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: <output_dir>/checkpoints/step_000123/ ; "latest" names the newest complete one

def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that `latest` names, if it is complete."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete")
    return path


def save_checkpoint(engine, output_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                    export: dict[str, torch.Tensor] | None, model_cfg, keep_last: int, is_main: bool) -> Path:
    """Write DeepSpeed state and an exported model under a temporary name, then rename it and point `latest` at it.

    A crash at any moment leaves `latest` naming an older, complete checkpoint.
    """
    from vlpretrain.models import export_model

    root = checkpoint_root(output_dir)
    name = f"step_{step:08d}"
    tmp_tag = f".tmp-{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    final = root / name
    if is_main:
        tmp = root / tmp_tag
        if export is not None:
            export_model(None, model_cfg, tmp / "model.safetensors", state_dict=export)
        (tmp / "client_state.json").write_text(json.dumps(client_state, indent=2) + "\n")
        (tmp / "COMPLETE").write_text(name + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")
        _prune(root, keep_last)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file())
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore engine state (weights, optimizer, schedule) from a complete checkpoint; returns our client state."""
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint")
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
    return json.loads((path / "client_state.json").read_text())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, or from a run folder / checkpoints folder through its `latest`."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    found = latest_checkpoint(p.parent if p.name == "checkpoints" else p)
    if found is None:
        raise CheckpointError(f"{p}: not a checkpoint, nor a run folder with a complete checkpoint")
    return found


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Consolidated safetensors model from a checkpoint of any ZeRO stage, loadable by open_clip for dense models.

    Uses the consolidated weights saved with the checkpoint; when they are missing, rebuilds them from the ZeRO
    partitions with DeepSpeed's zero_to_fp32 (which unpickles: use it only on checkpoints you wrote).
    """
    from vlpretrain.config import from_dict
    from vlpretrain.models import export_model, load_state_dict

    ckpt = resolve_checkpoint(path)
    cfg = from_dict(json.loads((ckpt / "client_state.json").read_text())["config"], str(ckpt))
    if (ckpt / "model.safetensors").is_file():
        state = load_state_dict(ckpt / "model.safetensors")
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return export_model(None, cfg.model, out, state_dict=state)
