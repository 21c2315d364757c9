"""vlpretrain: contrastive vision-language pretraining on open_clip towers with DeepSpeed ZeRO and sparse MoE."""

from vlpretrain.config import RunConfig, load_config
from vlpretrain.errors import VLPretrainError

__version__ = "0.1.0"


def build_model(*args, **kwargs):
    """Build the two towers from a ModelConfig or an architecture name (see vlpretrain.models.build_model)."""
    from vlpretrain.models import build_model as _build

    return _build(*args, **kwargs)


__all__ = ["RunConfig", "VLPretrainError", "build_model", "load_config", "__version__"]
