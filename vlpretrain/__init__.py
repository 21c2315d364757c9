"""vlpretrain: contrastive vision-language pretraining on open_clip towers with DeepSpeed ZeRO and sparse MoE."""

from vlpretrain.config import RunConfig, load_config
from vlpretrain.errors import VLPretrainError

__version__ = "0.1.0"


def build_model(*args, **kwargs):
    """Build the two towers from a ModelConfig or an architecture name (see vlpretrain.models.build_model)."""
    from vlpretrain.models import build_model as _build

    return _build(*args, **kwargs)


def upcycle(*args, **kwargs):
    """Turn a dense model or checkpoint into an MoE model whose experts copy its MLPs (see vlpretrain.models.upcycle)."""
    from vlpretrain.models.upcycle import upcycle as _upcycle

    return _upcycle(*args, **kwargs)


__all__ = ["RunConfig", "VLPretrainError", "build_model", "load_config", "upcycle", "__version__"]
