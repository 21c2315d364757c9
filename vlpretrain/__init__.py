"""vlpretrain: contrastive vision-language pretraining on open_clip towers with DeepSpeed ZeRO and sparse MoE.

Public API: `build_model`, `load_model`, `train`, `upcycle`, `load_config`, `write_shards`, `build_loader`,
`curate`. Each is imported on first use, so that `import vlpretrain.errors` (as `zeroshot` does) loads neither the
trainer nor the data stack; DeepSpeed itself is imported only when an engine is built.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RunConfig": "vlpretrain.config",
    "load_config": "vlpretrain.config",
    "VLPretrainError": "vlpretrain.errors",
    "build_loader": "vlpretrain.data",
    "write_shards": "vlpretrain.data",
    "build_model": "vlpretrain.models",
    "load_model": "vlpretrain.models",
    "upcycle": "vlpretrain.models",
    "train": "vlpretrain.trainer",
    "curate": "vlpretrain.curation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlpretrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
