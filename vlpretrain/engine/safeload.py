"""Reading DeepSpeed's state files without unpickling code: `torch.load` with weights_only and exactly DeepSpeed's own
types allowed. Below both the engine (`Engine.load`) and the checkpoint functions, which import it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from vlpretrain.errors import CheckpointError


def _deepspeed_types() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its state files (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints); nothing else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """`torch.load` with weights_only=True and exactly DeepSpeed's own types allowed: a file that would need any
    other object (code) is refused, as is a truncated one, with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refusing to load: it holds objects other than tensors and DeepSpeed's "
                              f"state types, and loading them could run code ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot read (truncated or corrupt? {first[:200]}); resume from an "
                              "earlier checkpoint with --resume CKPT") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` in this process reads weights only (DeepSpeed's own types allowed) while inside: for
    DeepSpeed's universal-checkpoint converter and loader, which call `torch.load(weights_only=False)` themselves."""
    original, allowed = torch.load, _deepspeed_types()

    def load(f, map_location=None, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(allowed):
            return original(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
