"""vlpretrain: contrastive vision-language pretraining on open_clip towers with DeepSpeed ZeRO and sparse MoE.

Public API: `build_model`, `train`, `upcycle`, `load_config`, `write_shards`, `build_loader`. DeepSpeed itself is
imported only when an engine is built.
"""

from vlpretrain.config import RunConfig, load_config
from vlpretrain.data import build_loader, write_shards
from vlpretrain.errors import VLPretrainError
from vlpretrain.models import build_model, load_model
from vlpretrain.models.upcycle import upcycle

# bound after the submodule import so that `vlpretrain.train` is the function, not the module
from vlpretrain.train import train  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = ["RunConfig", "VLPretrainError", "build_loader", "build_model", "load_config", "load_model", "train",
           "upcycle", "write_shards", "__version__"]
