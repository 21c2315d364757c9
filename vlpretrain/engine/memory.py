"""Memory of the model states per rank (weights, gradients, optimizer states) under each ZeRO stage, before a launch.

ZeRO-2 and ZeRO-3 come from DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), which assume 16-bit mixed precision with Adam: per trainable parameter
2 bytes of 16-bit weights, and 18 bytes that ZeRO may partition over the N ranks: 2 of 16-bit gradients + 4 of fp32
gradients + 4 of fp32 master weights + 8 of Adam moments. ZeRO-0 and ZeRO-1 use the same accounting:

    ZeRO-0  (2 + 18) P                      nothing partitioned
    ZeRO-1  (2 + 2 + 4) P + (4 + 8) P / N   master weights and moments partitioned
    ZeRO-2  2 P + 18 P / N                  (DeepSpeed) gradients partitioned too
    ZeRO-3  4 L + 18 P / N                  (DeepSpeed) weights partitioned too; L = the largest layer, gathered

For fp32 training DeepSpeed's estimators do not apply as they are; the same accounting with 4-byte weights and one
4-byte gradient gives: ZeRO-0 16 P (torch's AdamW updates the weights in place: no master copy), ZeRO-1 8 P + 12 P / N,
ZeRO-2 4 P + 16 P / N, ZeRO-3 4 L + 16 P / N (ZeRO 1-3 keep an fp32 copy of each rank's partition even in fp32).
With the optimizer offloaded (ZeRO 1-3) the fp32 states live in host memory: DeepSpeed counts 2 P (16-bit weights)
on the GPU under ZeRO-2 (ZeRO-1 offloads through the same optimizer, so it is counted alike) and 4 L + 2 P / N under
ZeRO-3; fp32 widens the weights to 4 bytes. Host memory per node is DeepSpeed's figure (its 1.5 buffer factor
included). Locked parameters (LiT) carry weights only: they add their weights' bytes (divided by N under ZeRO-3)
and nothing else. Activations, buffers and fragmentation are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlpretrain.engine.dist import quiet_library_chatter
from vlpretrain.errors import ConfigError

with quiet_library_chatter():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs


@dataclass(frozen=True)
class StateMemory:
    """Bytes of model states under one ZeRO stage: per rank on its GPU, and per node in host memory."""

    stage: int
    offload: bool
    gpu_bytes: int
    cpu_bytes: int


def _stage01(stage: int, trainable: int, world_size: int, weight: int) -> int:
    """ZeRO-0/1 bytes per rank of the trainable parameters (module docstring): ZeRO-1 holds 8 bytes whole in both
    precisions (2 + 2 + 4, or 4 + 4), ZeRO-0 adds the master copy (bf16 only) and the moments unpartitioned."""
    if stage == 1:
        return 8 * trainable + 12 * trainable // world_size
    return (20 if weight == 2 else 16) * trainable


def model_state_memory(trainable: int, frozen: int, largest_layer: int, world_size: int, gpus_per_node: int,
                       precision: str) -> list[StateMemory]:
    """Model-state memory for ZeRO 0-3, without and (ZeRO 1-3) with the optimizer offloaded, for `trainable`
    and `frozen` (locked) parameter counts, the largest layer's parameters, and `precision` "bf16" or "fp32"."""
    if world_size < 1 or gpus_per_node < 1 or world_size % gpus_per_node:
        raise ConfigError(f"--gpus-per-node {gpus_per_node} must divide --world-size {world_size} (both >= 1)")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision: expected bf16 or fp32 to estimate memory, got {precision!r}")
    nodes, weight = world_size // gpus_per_node, 2 if precision == "bf16" else 4
    n, p = world_size, trainable
    frozen_bytes = weight * frozen
    # DeepSpeed's figures (16-bit), then for fp32 2 bytes more per weight and 2 fewer per gradient (2 + 4 -> 4)
    rows = []
    for offload in (False, True):
        cpu2, gpu2 = estimate_zero2_model_states_mem_needs(p, gpus_per_node, nodes, cpu_offload=offload)
        cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(p, largest_layer, gpus_per_node, nodes,
                                                              cpu_offload=offload, cpu_offload_params=False)
        if weight == 4:  # fp32: weights 2 -> 4 bytes, gradients 2 + 4 -> 4 bytes
            gpu2 += 2 * p - (0 if offload else 2 * p // n)
            gpu3 += 2 * p // n if offload else -(2 * p // n)
        if not offload:
            rows.append(StateMemory(0, False, _stage01(0, p, n, weight) + frozen_bytes, cpu2))
            rows.append(StateMemory(1, False, _stage01(1, p, n, weight) + frozen_bytes, cpu2))
        else:
            rows.append(StateMemory(1, True, gpu2 + frozen_bytes, cpu2))
        rows.append(StateMemory(2, offload, gpu2 + frozen_bytes, cpu2))
        rows.append(StateMemory(3, offload, gpu3 + frozen_bytes // n, cpu3))
    return sorted(rows, key=lambda r: (r.stage, r.offload))


def largest_layer_params(model) -> int:
    """Parameters of the module holding the most parameters directly (ZeRO-3 gathers one such layer at a time);
    DeepSpeed's `model_to_params` rule."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
