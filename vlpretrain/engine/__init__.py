"""The DeepSpeed engine, and the only package that imports DeepSpeed.

`dist` joins the process group, `core` wraps a plain model into an `Engine` (ZeRO stage, precision, accumulation,
parameter groups, schedule), `checkpoint` writes and reads its state atomically (`safeload` reads DeepSpeed's
state files without unpickling code, for both), `remote` mirrors checkpoints to `train.remote_dir`, `moe` swaps
DeepSpeed's MoE layer into a built model for expert parallelism, `memory` estimates model-state memory per ZeRO
stage with DeepSpeed's estimators (imported by itself, not here). Models and losses never know which engine runs
them; DeepSpeed is imported on first use.
"""

from vlpretrain.engine.checkpoint import (
    checkpoint_root,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_client_state,
    resolve_checkpoint,
    save_checkpoint,
    to_universal,
)
from vlpretrain.engine.core import Engine, build_engine, deepspeed_config, lr_at, param_groups
from vlpretrain.engine.dist import DistEnv, init_distributed, shutdown_distributed

__all__ = ["DistEnv", "Engine", "build_engine", "checkpoint_root", "deepspeed_config", "export_checkpoint",
           "init_distributed", "latest_checkpoint", "load_checkpoint", "lr_at", "param_groups", "read_client_state",
           "resolve_checkpoint", "save_checkpoint", "shutdown_distributed", "to_universal"]
