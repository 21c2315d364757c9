"""Towers from open_clip, sparse MoE layers and upcycling."""

from vlpretrain.models.clip import (
    build_model,
    count_parameters,
    export_model,
    export_open_clip_dir,
    get_tokenizer,
    image_size,
    image_transform,
    load_model,
    load_state_dict,
    load_weights,
    read_export_config,
    register_model_configs,
)
from vlpretrain.models.moe import (
    convert_to_moe,
    export_state_dict,
    moe_aux_loss,
    moe_layers,
    moe_losses,
    moe_stats,
)
from vlpretrain.models.upcycle import upcycle

__all__ = [
    "build_model",
    "convert_to_moe",
    "export_state_dict",
    "moe_aux_loss",
    "moe_layers",
    "moe_losses",
    "moe_stats",
    "upcycle",
    "count_parameters",
    "export_model",
    "export_open_clip_dir",
    "get_tokenizer",
    "image_size",
    "image_transform",
    "load_model",
    "load_state_dict",
    "load_weights",
    "read_export_config",
    "register_model_configs",
]
