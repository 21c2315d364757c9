"""The two towers, built by open_clip from any of its architectures or from a JSON config of ours.

We never fork open_clip's towers: this module only registers our configs, makes the temperature DeepSpeed-friendly,
loads local checkpoints safely and exports a consolidated file that open_clip itself can load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpretrain.config import ModelConfig
from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.models.hf_text import hf_text_options, resolve_hf_paths, set_hf_context
from vlpretrain.models.lock import lock_towers
from vlpretrain.models.moe import convert_to_moe
from vlpretrain.models.openclip import open_clip
from vlpretrain.models.patch_dropout import enable_patch_dropout

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
_registered = False


def register_model_configs() -> None:
    """Make configs/models/*.json (and $VLPRETRAIN_MODEL_CONFIGS) known to open_clip by file stem."""
    global _registered
    if _registered:
        return
    for d in [CONFIG_DIR, *filter(None, os.environ.get("VLPRETRAIN_MODEL_CONFIGS", "").split(os.pathsep))]:
        if Path(d).exists():
            open_clip.add_model_config(Path(d))
            for f in Path(d).glob("*.json") if Path(d).is_dir() else [Path(d)]:
                _register_resolved(f)
    _registered = True


def _read_architecture(path: Path) -> dict[str, Any]:
    """An architecture JSON file, its Hugging Face folders resolved against the file's folder (`resolve_hf_paths`)."""
    try:
        arch = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.name: {path} is not valid JSON ({e})") from None
    return resolve_hf_paths(arch, path) if isinstance(arch, dict) else arch


def _register_resolved(path: Path) -> None:
    """Where the file names Hugging Face folders relative to itself, have open_clip build from a copy that names
    them absolutely (same stem), so that open_clip and the tokenizer find them from any working folder."""
    raw = json.loads(path.read_text())
    arch = resolve_hf_paths(raw, path) if isinstance(raw, dict) else raw
    if arch is not raw:
        open_clip.add_model_config(_register_architecture(path.stem, arch))


def model_config_dict(name: str) -> dict[str, Any]:
    """The open_clip architecture dict of `name` (registry name or path to a JSON file)."""
    register_model_configs()
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise ConfigError(f"model.name: model config file does not exist: {name}")
        return _read_architecture(Path(name))
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"model.name: unknown architecture {name!r}: give an open_clip name "
                          "(open_clip.list_models()), a config in configs/models/, a path to an architecture "
                          "JSON (model.name: /path/arch.json), or a folder of JSONs in $VLPRETRAIN_MODEL_CONFIGS")
    return cfg


def _arch_name(name: str) -> str:
    """Register a JSON file path as an architecture and return the name open_clip knows it by."""
    register_model_configs()
    if name.endswith(".json"):
        model_config_dict(name)  # existence check
        open_clip.add_model_config(Path(name))
        _register_resolved(Path(name))
        return Path(name).stem
    model_config_dict(name)
    return name


def _flatten_scalars(model: nn.Module) -> None:
    """DeepSpeed cannot flatten 0-dim parameters: store logit_scale / logit_bias with shape [1]."""
    for attr in ("logit_scale", "logit_bias"):
        p = getattr(model, attr, None)
        if isinstance(p, nn.Parameter) and p.ndim == 0:
            setattr(model, attr, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint (.safetensors, or .pt/.bin read with weights_only=True)."""
    path = str(path)
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        state = open_clip.factory.load_state_dict(path, device="cpu", weights_only=True)
    except Exception as e:  # corrupt files and pickles that are not plain tensors
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: checkpoint holds no state dict")
    return state


def build_model(cfg: ModelConfig | str, open_clip_options: dict[str, Any] | None = None,
                load_pretrained: bool = True) -> nn.Module:
    """Build the open_clip model named by `cfg` (with MoE layers and local weights when configured).

    The model returns a dict of named outputs (open_clip's `output_dict`; a CoCa model always does), with the MoE
    auxiliary loss and routing statistics among them when it has MoE layers. `open_clip_options` go to open_clip's
    `create_model` (an objective's needs: SigLIP's logit bias and its initial values). Patch dropout
    (`model.patch_dropout`) and locked towers (`model.lock_image`, `model.lock_text`) are applied here.
    """
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    arch = _arch_name(cfg.name)
    options = {**hf_text_options(model_config_dict(cfg.name), cfg.name), **(open_clip_options or {})}
    with _quiet_open_clip():
        model = open_clip.create_model(arch, device="cpu", precision="fp32", **options)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        # open_clip leaves the CoCa decoder's output projection as torch.empty (its init_parameters, which would
        # set it, is never called and fails if called): a CoCa trained from scratch would start from whatever the
        # memory held (1e18 after other work). Its own rule: normal with std width ** -0.5
        nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    set_hf_context(model, model_config_dict(cfg.name), cfg.name)
    if hasattr(model, "output_dict"):
        model.output_dict = True
    if cfg.patch_dropout > 0:
        enable_patch_dropout(model, cfg.patch_dropout)
    if cfg.moe.num_experts > 0:
        convert_to_moe(model, cfg.moe)
    if cfg.pretrained and load_pretrained:
        load_weights(model, cfg.pretrained)
    _flatten_scalars(model)
    lock_towers(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'no pretrained weights' at WARNING on every random init; we load weights ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint (ours or open_clip's) into `model`, naming the file when keys do not match."""
    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    for attr in ("logit_scale", "logit_bias"):
        if attr in state and attr in own:
            state[attr] = state[attr].reshape(own[attr].shape)
    if "logit_bias" in own and "logit_bias" not in state:
        state["logit_bias"] = own["logit_bias"]
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: does not match the model ({len(wrong)} tensors of another shape, e.g. {k} "
                              f"{tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )


def is_conv_tower(model: nn.Module) -> bool:
    """Whether the image tower is convolutional (a ResNet: open_clip's ModifiedResNet or a timm CNN), not a
    ViT, whose one convolution is the patch embedding. On a GPU the trainer feeds such a tower channels_last
    (NHWC) images: every convolution then runs cuDNN's NHWC kernels (tensor cores in bf16) and passes the layout
    on; the weights stay as they are (DeepSpeed flattens them under ZeRO 1-3), converted per call, a small cost
    beside the activations."""
    visual = getattr(model, "visual", None)
    return visual is not None and sum(isinstance(m, nn.Conv2d) for m in visual.modules()) > 1


def get_tokenizer(cfg: ModelConfig | str):
    """The model's tokenizer: open_clip's BPE tokenizer, or the local Hugging Face tokenizer its `text_cfg` names
    (`hf_tokenizer_name`, loaded with AutoTokenizer); both work offline."""
    name = cfg if isinstance(cfg, str) else cfg.name
    hf_text_options(model_config_dict(name), name)  # local folders only
    return open_clip.get_tokenizer(_arch_name(name))


def image_size(model: nn.Module) -> int:
    """Square input resolution of the image tower."""
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    return int(size if isinstance(size, int) else size[0])


def image_transform(model: nn.Module, train: bool, size: int | None = None,
                    crop_scale: tuple[float, float] = (0.9, 1.0), augment: bool = True):
    """open_clip's preprocessing for this model (random resized crop while training when `augment`)."""
    pp = open_clip.get_model_preprocess_cfg(model)
    size = size or image_size(model)
    aug = {"scale": tuple(crop_scale)} if (train and augment) else None
    return open_clip.image_transform(size, is_train=train and augment, mean=pp["mean"], std=pp["std"],
                                     interpolation=pp.get("interpolation"), resize_mode=pp.get("resize_mode"),
                                     aug_cfg=aug)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, per-tower, active-per-token (MoE layers count only k of their experts) and trainable (not locked)
    parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for p in model.visual.parameters()) if hasattr(model, "visual") else 0
    inactive = 0
    for m in model.modules():
        fn = getattr(m, "inactive_parameters", None)
        if callable(fn):
            inactive += fn()
    return {"total": total, "image tower": image, "text tower and rest": total - image,
            "active per token": total - inactive,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def export_model(model: nn.Module, cfg: ModelConfig, out: str | os.PathLike,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a consolidated safetensors file (config in its metadata) and a config JSON beside it.

    The temperature is written 0-dim, as open_clip stores it, so `open_clip.create_model(arch, pretrained=out)`
    loads a dense export directly.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in (state_dict or model.state_dict()).items()}
    for attr in ("logit_scale", "logit_bias"):
        if attr in state and state[attr].numel() == 1:
            state[attr] = state[attr].reshape(())
    meta = {"format": "vlpretrain", "model_config": json.dumps(_model_cfg_dict(cfg))}
    if cfg.name.endswith(".json"):
        # the architecture itself, so the export still loads once that JSON has moved or gone
        meta["architecture"] = json.dumps(model_config_dict(cfg.name))
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(_model_cfg_dict(cfg), indent=2) + "\n")
    return out


def export_open_clip_dir(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out: str | os.PathLike) -> Path:
    """open_clip's local model folder: `open_clip_config.json` (model_cfg, preprocess_cfg) and
    `open_clip_model.safetensors`, so `open_clip.create_model_and_transforms("local-dir:OUT")` (and CLIP_benchmark's
    `--model local-dir:OUT`) load it without knowing our configs; a Hugging Face tokenizer the config names
    (`text_cfg.hf_tokenizer_name`) is saved in the folder too, where `open_clip.get_tokenizer("local-dir:OUT")`
    reads it. Dense models only: open_clip has no MoE layers."""
    from safetensors.torch import save_file

    if cfg.moe.num_experts > 0:
        raise ConfigError("model.moe: an MoE model cannot be an open_clip folder (open_clip has no MoE layers); "
                          "export it as .safetensors and load it with vlpretrain.models.load_model")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    with _quiet_open_clip():
        model = open_clip.create_model(_arch_name(cfg.name), device="cpu",
                                       **hf_text_options(model_config_dict(cfg.name), cfg.name))
    # the sizes, mean and std open_clip would use for this architecture, written out in full
    preprocess = {**dataclasses.asdict(open_clip.transform.PreprocessCfg()),
                  **open_clip.get_model_preprocess_cfg(model)}
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()}
    state = {k: v.detach().float().contiguous().clone() for k, v in state_dict.items()}
    for attr in ("logit_scale", "logit_bias"):
        if attr in state and state[attr].numel() == 1:
            state[attr] = state[attr].reshape(())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    config = {"model_cfg": model_config_dict(cfg.name), "preprocess_cfg": preprocess}
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
    if tokenizer:
        # open_clip reads a local-dir model's Hugging Face tokenizer from that folder, whatever the config names
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a half-written folder never carries the final name
    return out


def _model_cfg_dict(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["pretrained"] = None
    return d


def read_export_config(path: str | os.PathLike) -> ModelConfig | None:
    """The ModelConfig stored in an exported safetensors file, or None for other checkpoints."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated? {e})") from None
    if "model_config" not in meta:
        return None
    from vlpretrain.config import from_dict

    cfg = from_dict({"model": _metadata_json(path, meta, "model_config")}, str(path)).model
    if "architecture" in meta:
        cfg.name = str(_register_architecture(Path(cfg.name).stem, _metadata_json(path, meta, "architecture")))
    return cfg


def _metadata_json(path: Path, meta: dict[str, str], key: str) -> dict[str, Any]:
    """The JSON object `export_model` stored under `key` in an export's metadata; a damaged one names the file."""
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its {key} metadata is not valid JSON ({e}); export the model again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: its {key} metadata is not a JSON object; export the model again")
    return value


def _register_architecture(stem: str, arch: dict[str, Any]) -> Path:
    """A JSON file holding `arch` under the cache (named by its content), for open_clip to build from."""
    text = json.dumps(arch, indent=2, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VLPRETRAIN_CACHE", Path.home() / ".cache" / "vlpretrain"))
    path = cache / "architectures" / digest / f"{stem}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    return path


def load_model(path_or_arch: str, pretrained: str | None = None) -> nn.Module:
    """A model from an exported file of ours, or an architecture name plus an optional local checkpoint."""
    looks_like_file = Path(path_or_arch).suffix in (".safetensors", ".pt", ".bin", ".pth") or os.sep in path_or_arch
    if looks_like_file and not path_or_arch.endswith(".json") and not Path(path_or_arch).is_file():
        raise CheckpointError(f"{path_or_arch}: model file does not exist")
    cfg = read_export_config(path_or_arch)
    if cfg is not None:
        cfg.pretrained = str(path_or_arch)
        # a standalone model uses the native MoE layer: it reads every backend's export, needs no process group
        cfg.moe = dataclasses.replace(cfg.moe, backend="native", ep_size=1)
        # how it was trained is not how it is used: a loaded model has no locked tower
        cfg.lock_image = cfg.lock_text = False
        cfg.lock_image_unlocked_blocks = cfg.lock_text_unlocked_blocks = 0
        cfg.patch_dropout = 0.0
    else:
        cfg = ModelConfig(name=path_or_arch, pretrained=pretrained)
    state_has_bias = False
    if cfg.pretrained:
        state_has_bias = "logit_bias" in load_state_dict(cfg.pretrained)
    # a logit bias to load into (its initial value is replaced by the checkpoint's)
    return build_model(cfg, {"init_logit_bias": 0.0} if state_has_bias else None)
