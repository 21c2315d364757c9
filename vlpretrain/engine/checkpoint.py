"""Checkpoints: `<output_dir>/checkpoints/step_XXXXXXXX/`, written under a temporary name and renamed; `latest`
names the newest complete one. Exports of a checkpoint's consolidated model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from vlpretrain.console import format_bytes
from vlpretrain.engine.core import Engine
from vlpretrain.engine.dist import DistEnv
from vlpretrain.engine.safeload import safe_torch_load as safe_torch_load  # re-exported: its old home
from vlpretrain.engine.safeload import weights_only_loads
from vlpretrain.errors import CheckpointError


def to_universal(path: Path, dest: Path) -> None:
    """Convert a ZeRO 1-2 checkpoint into DeepSpeed's universal format (one file per parameter and optimizer
    moment, whole), which a run of any world size loads with `checkpoint: {load_universal: true}`."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dest, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(dest), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            ds_to_universal.main(args)
        (dest.parent / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; ours is `latest`
    except (AssertionError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: DeepSpeed could not convert it for another world size ({first[:200]}); "
                              "resume with the world size it was saved at") from None


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that `latest` names, if it is complete."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete")
    return path


_NAME = re.compile(r"step_(\d{8})(?:-(\d+))?")


def _order(path: Path) -> tuple[int, int] | None:
    """(step, re-save number) of a checkpoint folder's name, None for anything else (`.tmp-*`, `latest`)."""
    m = _NAME.fullmatch(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _fresh(root: Path, name: str) -> Path:
    """`name`, or `name-1`, `name-2`, ... when a checkpoint of that step is already there (a resumed run reaching
    it again): `latest` may name the old one, which must stay whole until `latest` names the new one."""
    path, k = root / name, 0
    while path.exists():
        k += 1
        path = root / f"{name}-{k}"
    return path


def _write_failure(root: Path, tmp: Path, reason: str) -> str:
    """The one-line message for a checkpoint that could not be written (a full disk, most often)."""
    free = f"{format_bytes(shutil.disk_usage(root).free)} free on its file system"
    try:
        last = latest_checkpoint(root.parent)
    except CheckpointError:
        last = None
    if last is None:
        where = "there is no earlier complete checkpoint"
    else:
        free += f", a checkpoint takes about {format_bytes(sum(f.stat().st_size for f in last.iterdir()))}"
        where = f"checkpoints/latest still names {last.name}"
    return (f"{tmp}: could not write this checkpoint: {free} ({reason}); removed it and stopped; {where}; "
            "free some space, then continue with --resume latest")


def save_checkpoint(engine: Engine, output_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                    export: dict[str, torch.Tensor] | None, model_cfg, keep_last: int, env: DistEnv) -> Path:
    """Write DeepSpeed state and an exported model under a temporary name, then rename it and point `latest` at it.

    A crash at any moment leaves `latest` naming a complete checkpoint: a step saved again (after resuming from
    an earlier one) gets a fresh name, and the old folder goes only once `latest` names the new one. When any rank
    cannot write its part (a full disk), every rank raises the same CheckpointError, the temporary folder is
    removed and `latest` is untouched.
    """
    from vlpretrain.models import export_model

    root = checkpoint_root(output_dir)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    error = engine.save(str(root), tmp.name, client_state)
    failed = env.any(*(r == env.rank and error is not None for r in range(env.world_size)))  # collective
    outcome = None
    if env.is_main:
        final = None
        try:
            if any(failed):
                bad = failed.index(True)
                raise OSError(error if bad == 0 else f"rank {bad} could not write its part")
            if export is not None:
                export_model(None, model_cfg, tmp / "model.safetensors", state_dict=export)
            (tmp / "client_state.json").write_text(json.dumps(client_state, indent=2) + "\n")
            (tmp / "COMPLETE").write_text(name + "\n")
            final = _fresh(root, name)
            os.replace(tmp, final)
            pointer = root / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / "latest")
            outcome = {"name": final.name}
        except (OSError, RuntimeError, SafetensorError) as e:
            for path in (tmp, final, root / ".latest.tmp"):
                if path is not None and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path is not None and path.exists():
                    path.unlink()
            outcome = {"error": _write_failure(root, tmp, (str(e).strip().splitlines() or ["?"])[0][:200])}
    outcome = env.share(outcome)  # collective: every rank stops, or goes on, together
    if "error" in outcome:
        raise CheckpointError(outcome["error"])
    final = root / outcome["name"]
    if env.is_main:
        for old in root.glob(f"{name}*"):  # the same step's earlier folder, no longer named by `latest`
            if old != final and _order(old) is not None and _order(old)[0] == step:
                shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, final)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep_last: int, current: Path) -> None:
    """Remove complete checkpoints beyond the newest `keep_last` by step, never the one just written (which
    `latest` names)."""
    done = sorted((p for p in root.glob("step_*")
                   if _order(p) is not None and (p / "COMPLETE").is_file() and p != current), key=_order)
    keep = max(keep_last - 1, 0)
    for old in done[:max(len(done) - keep, 0)]:  # a negative bound would slice from the end
        shutil.rmtree(old, ignore_errors=True)


def read_client_state(path: Path) -> dict[str, Any]:
    """Our part of a complete checkpoint (train state, run config, world size), read as JSON."""
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint")
    return json.loads((path / "client_state.json").read_text())


def load_checkpoint(engine: Engine, path: Path, universal: Path | None = None) -> dict[str, Any]:
    """Restore engine state (weights, optimizer, schedule) from a complete checkpoint, or from `universal`, its
    conversion by `to_universal` (for an engine built to load one); returns our client state."""
    client = read_client_state(path)
    source = universal or path
    with weights_only_loads() if universal else contextlib.nullcontext():
        if not engine.load(str(source.parent), source.name):
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
    return client


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, or from a run folder / checkpoints folder through its `latest`."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    found = latest_checkpoint(p.parent if p.name == "checkpoints" else p)
    if found is None:
        raise CheckpointError(f"{p}: not a checkpoint, nor a run folder with a complete checkpoint")
    return found


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, format: str = "safetensors") -> Path:
    """A consolidated model from a checkpoint of any ZeRO stage (or a run folder, or an export of ours).

    format "safetensors": our export (config in its metadata), loadable by open_clip for dense models;
    "open_clip": open_clip's local model folder (`local-dir:OUT`). Every checkpoint this package writes holds its
    consolidated weights as `model.safetensors`, so exporting never reads (let alone unpickles) DeepSpeed's state.
    """
    from vlpretrain.config import from_dict
    from vlpretrain.models import export_model, export_open_clip_dir, load_state_dict, read_export_config

    src = Path(path)
    if src.is_file() and (model_cfg := read_export_config(src)) is not None:
        weights = src
    else:
        ckpt = resolve_checkpoint(path)
        weights = ckpt / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{ckpt}: has no model.safetensors (every checkpoint vlpretrain writes has one; "
                                  "DeepSpeed state files are never unpickled to rebuild it)")
        model_cfg = from_dict(json.loads((ckpt / "client_state.json").read_text())["config"], str(ckpt)).model
    state = load_state_dict(weights)
    if format == "open_clip":
        return export_open_clip_dir(state, model_cfg, out)
    return export_model(None, model_cfg, out, state_dict=state)
