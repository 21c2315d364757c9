"""Sparse upcycling: a dense model or checkpoint becomes an MoE model whose experts all start as its MLPs.

Komatsuzaki et al. (2022) reuse the sunk cost of dense training this way. Everything but the routers is
copied; routers start fresh from a seeded init, and optimizer state starts fresh. With no token dropped and
normalised combine weights the result computes exactly what the dense model did.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from vlpretrain.config import ModelConfig, MoEConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models.clip import export_model, load_model, read_export_config
from vlpretrain.models.moe import convert_to_moe, export_state_dict, moe_layers, validate_moe_config


def load_dense(source: nn.Module | str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, str | None]:
    """The dense model to upcycle and its architecture name: a model object, an export of ours, or an
    open_clip checkpoint file read as `arch`."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source), arch
    exported = read_export_config(source)
    if exported is not None:
        if exported.moe.num_experts > 0:
            raise ConfigError(f"{source}: already an MoE model ({exported.moe.num_experts} experts); "
                              "upcycle a dense checkpoint")
        if arch is not None and arch != exported.name:
            raise ConfigError(f"--arch {arch}: {source} was exported as {exported.name!r}")
        return load_model(str(source)), exported.name
    if arch is None:
        raise ConfigError(f"{source}: not an export of ours, so name its architecture (--arch / model.name)")
    return load_model(arch, pretrained=str(source)), arch


def upcycle(dense: nn.Module | str | os.PathLike, moe_cfg: MoEConfig, out: str | os.PathLike | None = None,
            *, arch: str | None = None, seed: int = 0) -> nn.Module:
    """Turn `dense` (a model, our export, or an open_clip checkpoint of architecture `arch`) into an MoE model.

    Every expert copies its block's dense MLP, routers are drawn from a generator seeded with `seed`, and the
    rest is copied. With `out`, writes an export whose stored config carries `moe_cfg`, so that
    `load_model(out)` rebuilds it and `train --set model.pretrained=OUT` (same `model.moe`) starts from it.
    The returned model uses the native layer (all experts in one process); the file loads into either backend.
    """
    validate_moe_config(moe_cfg)
    model, name = load_dense(dense, arch)
    if moe_layers(model):
        raise ConfigError("upcycle: the source model already has MoE layers")
    convert_to_moe(model, dataclasses.replace(moe_cfg, backend="native", ep_size=1))
    generator = torch.Generator().manual_seed(seed)
    for layer in moe_layers(model):
        layer.reset_router(generator)
    if out is not None:
        if name is None:
            raise ConfigError("upcycle: name the architecture (arch=...) to export a model object")
        export_model(model, ModelConfig(name=name, moe=dataclasses.replace(moe_cfg)), out,
                     state_dict=export_state_dict(model))
    return model
