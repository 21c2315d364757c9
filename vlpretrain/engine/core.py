"""The engine: a plain model goes in, an `Engine` comes out that does backward, step, ZeRO partitioning, precision
and gradient accumulation, and saves or loads its state. The loop speaks only `Engine`'s small vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlpretrain.config import RunConfig, TrainConfig
from vlpretrain.engine.dist import DistEnv
from vlpretrain.engine.safeload import safe_torch_load
from vlpretrain.errors import CheckpointError


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


def zero_stage_run(t: TrainConfig) -> int:
    """The ZeRO stage DeepSpeed runs: `train.zero_stage`, except that bf16 under stage 0 runs as stage 1.

    DeepSpeed's stage-0 bf16 path accumulates gradients in bf16 and checks every parameter's gradient for overflow
    on the host (one device sync per tensor per step); its stage-1 BF16_Optimizer keeps fp32 gradients and master
    weights in flat buffers, steps them with one fused AdamW and reads the gradient norm once per step. Stage 1
    computes the same update; on one device it partitions nothing, on several it splits the optimizer state.
    """
    return 1 if t.precision == "bf16" and t.zero_stage == 0 else t.zero_stage


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict derived from the run config (there is no separate DeepSpeed JSON to keep in step);
    `load_universal` for an engine that resumes from a universal checkpoint (another world size)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": zero_stage_run(t)}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:  # the schema allows it with ZeRO 1-3 only
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        # offloaded, the optimizer is DeepSpeed's CPU Adam, which cannot skip a step on a device flag
        # (`Engine.skip_update_when`): DeepSpeed's own check of the gradient norm must catch non-finite gradients
        "bf16": {"enabled": t.precision == "bf16", **({"check_grad_overflow": True} if t.offload_optimizer else {})},
        # bf16 weights, fp32 gradients and master weights: DeepSpeed's BF16_Optimizer under ZeRO 1 (see zero_stage_run)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if t.precision == "bf16" and zero_stage_run(t) == 1 else {}),
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            # torch's fused AdamW (CPU and GPU): one kernel over all tensors instead of a loop per parameter
            "torch_adam": not t.offload_optimizer, **({} if t.offload_optimizer else {"fused": True})}},
        "zero_allow_untested_optimizer": True,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """What the training loop asks of DeepSpeed: forward, backward, step, the accumulation boundary, the learning
    rate, consolidated weights, and saving or loading state. Nothing else in the package touches DeepSpeed's API."""

    def __init__(self, ds_engine: Any, moe: bool):
        self._ds, self._moe = ds_engine, moe

    @property
    def module(self) -> nn.Module:
        """The plain model inside (its MoE layers record auxiliary losses here)."""
        return self._ds.module

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self._ds(*inputs)

    def backward(self, loss: torch.Tensor, average_micro_steps: bool = True) -> None:
        """Gradients of `loss`, accumulated; `average_micro_steps` divides them by the micro-steps per optimizer
        step (DeepSpeed's default), which a caller whose loss already carries the exact gradient turns off."""
        self._ds.backward(loss, scale_wrt_gas=average_micro_steps)

    def step(self) -> None:
        """Apply the accumulated gradients at an accumulation boundary (DeepSpeed counts micro-steps itself)."""
        self._ds.step()

    def skip_update_when(self, flag: torch.Tensor) -> bool:
        """Make every optimizer step read `flag` (a float scalar on the device, updated in place by the caller):
        where it is 1 the step leaves weights and optimizer state untouched, decided on the device, so the host
        never waits for the loss. torch's fused AdamW does this (`found_inf`, as torch.amp's GradScaler uses it)
        under every ZeRO stage, since DeepSpeed's wrappers step the optimizer it was given. False when the
        optimizer cannot (DeepSpeed's CPU Adam, offloaded); DeepSpeed's own overflow check skips those steps."""
        opt = self._ds.basic_optimizer
        if not (isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused")):
            return False
        opt.found_inf = flag
        return True

    @property
    def lr(self) -> float:
        return self._ds.get_lr()[0]

    def compile(self) -> None:
        self._ds.compile()

    def consolidated_weights(self) -> dict[str, torch.Tensor] | None:
        """Full model weights in float32 on the CPU, on rank 0 (None elsewhere), from any ZeRO stage; collective
        under ZeRO-3 and for MoE experts split across ranks. MoE weights come out in the one format both backends
        load."""
        ds = self._ds
        if ds.zero_optimization_partition_weights():
            state = ds._zero3_consolidated_16bit_state_dict()
        elif self._moe:
            from vlpretrain.models.moe import export_state_dict

            state = export_state_dict(ds.module)  # every rank: gathers expert-parallel experts
            state = state if torch.distributed.get_rank() == 0 else None
        else:
            state = ds.module.state_dict() if torch.distributed.get_rank() == 0 else None
        if state is None:
            return None
        return {k: v.detach().float().cpu() for k, v in state.items()}

    def save(self, folder: str, tag: str, client_state: dict[str, Any]) -> str | None:
        """DeepSpeed's state (weights, optimizer, schedule) as `folder/tag/`; collective. Returns why this rank
        could not write its files (a full disk), or None.

        A failed write must not raise inside DeepSpeed's save: this rank would skip the collectives still to
        come there while the other ranks wait in them. So this rank's writes record their first error and
        DeepSpeed goes on to its end on every rank; the caller then asks all ranks whether any failed.
        """
        ds, errors = self._ds, []

        def recording(write):
            def attempt(*args, **kwargs):
                if errors:  # the disk is full: write nothing more
                    return None
                try:
                    return write(*args, **kwargs)
                except (OSError, RuntimeError) as e:
                    errors.append((str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            return attempt

        engine = ds.checkpoint_engine
        saved = engine.save, engine.makedirs, ds._copy_recovery_script
        engine.save, engine.makedirs = recording(engine.save), recording(engine.makedirs)
        ds._copy_recovery_script = recording(ds._copy_recovery_script)
        try:
            ds.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)
        finally:
            engine.save, engine.makedirs, ds._copy_recovery_script = saved
        return errors[0] if errors else None

    def load(self, folder: str, tag: str) -> bool:
        """Restore the state saved as `folder/tag/`; False when DeepSpeed found nothing to load.

        Every file is read through `safe_torch_load` (weights_only, DeepSpeed's own types allowed), never
        unpickled in full; a file of another model raises CheckpointError naming it.
        """
        self._ds.checkpoint_engine.load = safe_torch_load
        try:
            loaded, _ = self._ds.load_checkpoint(folder, tag=tag)
        except RuntimeError as e:  # load_state_dict of another architecture: missing/unexpected keys, shapes
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{folder}/{tag}: does not fit this model (another architecture or "
                                  f"model.moe setting?): {first[:300]}") from None
        return loaded is not None


def build_engine(model: nn.Module, cfg: RunConfig, env: DistEnv, load_universal: bool = False) -> Engine:
    """Wrap `model` in a DeepSpeed engine with our parameter groups and warmup-cosine schedule (`load_universal`:
    to load a universal checkpoint, see `deepspeed_config`). With `model.moe.backend: deepspeed` its MoE layers
    become DeepSpeed's first (in place: `model` is the engine's module)."""
    import deepspeed

    moe = cfg.model.moe.num_experts > 0
    if moe:
        from vlpretrain.engine.moe import moe_param_groups, use_deepspeed_moe

        if cfg.model.moe.backend == "deepspeed":  # the model was built with the native layer
            use_deepspeed_moe(model, cfg.model.moe)
    groups = param_groups(model, cfg.train.weight_decay)
    if moe:
        groups = moe_param_groups(groups)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg.train) / cfg.train.lr)

    ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                       config=deepspeed_config(cfg, env.world_size, load_universal),
                                       lr_scheduler=schedule)
    if env.world_size == 1 and zero_stage_run(cfg.train) == 0:
        # averaging gradients over one rank is the identity; DeepSpeed would still flatten and copy them every step
        ds.enable_backward_allreduce = False
    return Engine(ds, moe)
