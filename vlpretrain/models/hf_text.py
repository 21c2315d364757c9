"""Hugging Face text towers and tokenizers, as open_clip builds them from a model config whose `text_cfg` names
`hf_model_name` (a tower) or `hf_tokenizer_name` (a tokenizer, also beside open_clip's own text transformer).

open_clip's HFTextEncoder wraps any `transformers` encoder: it pools the last hidden states (mean over the non-pad
tokens by default, `hf_pooler_type`) and projects them to the embedding width (`hf_proj_type`: mlp, linear, or
none when widths match). We only insist that the names are local folders (config, tokenizer files, and weights when
the tower starts pretrained), so that nothing downloads: a folder with weights (model.safetensors or
pytorch_model.bin) starts from them, a folder with only config.json starts from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vlpretrain.errors import ConfigError

HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_text_options(arch: dict[str, Any], where: str) -> dict[str, Any]:
    """open_clip `create_model` options for an architecture dict: `pretrained_text` for an HF text tower whose
    folder holds weights; {} for open_clip's own towers. Checks the folders exist and sets HF_HUB_OFFLINE."""
    text_cfg = arch.get("text_cfg", {})
    if not text_cfg.get("hf_model_name"):
        if text_cfg.get("hf_tokenizer_name"):
            check_tokenizer_fits(arch, where)
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub; a typo must not reach it
    require_transformers(f"{where}: text_cfg.hf_model_name")
    folder = _local_folder(text_cfg["hf_model_name"], f"{where}: text_cfg.hf_model_name", "config.json")
    if text_cfg.get("hf_tokenizer_name"):
        _local_folder(text_cfg["hf_tokenizer_name"], f"{where}: text_cfg.hf_tokenizer_name", None)
    has_weights = any((folder / f).is_file() for f in WEIGHT_FILES)
    return {"pretrained_text": has_weights and bool(text_cfg.get("hf_model_pretrained", True))}


def check_tokenizer_fits(arch: dict[str, Any], where: str) -> None:
    """An open_clip text transformer (and CoCa decoder) fed by the Hugging Face tokenizer `text_cfg.hf_tokenizer_name`
    has room for all its tokens and pads with its padding id; else ConfigError naming the key."""
    text_cfg = arch["text_cfg"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_transformers(f"{where}: text_cfg.hf_tokenizer_name")
    folder = _local_folder(text_cfg["hf_tokenizer_name"], f"{where}: text_cfg.hf_tokenizer_name", None)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: text_cfg.hf_tokenizer_name: {folder} holds no tokenizer ({e})") from None
    size, pad = len(tokenizer), tokenizer.pad_token_id
    keys = [("text_cfg.vocab_size", text_cfg.get("vocab_size", 49408))]
    if "multimodal_cfg" in arch:
        keys.append(("multimodal_cfg.vocab_size", arch["multimodal_cfg"].get("vocab_size", 49408)))
    for key, vocab in keys:
        if vocab < size:
            raise ConfigError(f"{where}: {key} {vocab} is smaller than the {size} tokens of its tokenizer {folder}")
    keys = [("text_cfg.pad_id", text_cfg.get("pad_id", 0))]
    if "multimodal_cfg" in arch:
        keys.append(("pad_id", arch.get("pad_id", 0)))  # CoCa's own: generate pads finished captions with it
    for key, value in keys:
        if pad is not None and value != pad:
            raise ConfigError(f"{where}: {key} is {value}, but its tokenizer {folder} pads with id {pad}: set {key}: "
                              f"{pad}")


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, end, padding) token ids of an open_clip tokenizer: its BPE SimpleTokenizer's <start_of_text>,
    <end_of_text> and 0, or a Hugging Face tokenizer's (HFTokenizer) bos (else cls), eos (else sep) and pad."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None:
        return int(getattr(tokenizer, "sot_token_id", 49406)), int(getattr(tokenizer, "eot_token_id", 49407)), 0
    sot = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
    eot = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    return int(sot), int(eot), int(hf.pad_token_id or 0)


def resolve_hf_paths(arch: dict[str, Any], json_file: str | os.PathLike) -> dict[str, Any]:
    """`arch` (read from `json_file`) with a relative `text_cfg.hf_model_name` / `hf_tokenizer_name` made absolute
    against the JSON file's folder when it exists there; other names stay as they are (relative to the working
    folder). A copy when anything changes, else `arch` itself."""
    text_cfg = arch.get("text_cfg")
    if not isinstance(text_cfg, dict):
        return arch
    base = Path(json_file).resolve().parent
    resolved = {}
    for key in HF_PATH_KEYS:
        name = text_cfg.get(key)
        if isinstance(name, str) and name and not Path(name).is_absolute() and (base / name).is_dir():
            resolved[key] = str(base / name)
    return {**arch, "text_cfg": {**text_cfg, **resolved}} if resolved else arch


def require_transformers(what: str) -> None:
    """Raise ConfigError naming `what` when `transformers` / `tokenizers` are not installed."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs Hugging Face transformers and tokenizers: "
                          "pip install 'vlpretrain[multilingual]'") from None
    from vlpretrain.models.openclip import need_transformers

    need_transformers()  # open_clip's HF tower was imported without it


def _local_folder(name: str, key: str, must_hold: str | None) -> Path:
    folder = Path(name)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {name!r} is not a local folder (Hugging Face towers and tokenizers load from a "
                          "folder of config, tokenizer and weights files; nothing downloads)")
    if must_hold and not (folder / must_hold).is_file():
        raise ConfigError(f"{key}: {folder} has no {must_hold}")
    return folder


def hf_text_tower(model: nn.Module) -> nn.Module | None:
    """The model's open_clip HFTextEncoder, or None when its text tower is open_clip's own."""
    text = getattr(model, "text", None)
    return text if text is not None and type(text).__name__ == "HFTextEncoder" else None


def hf_layers(tower: nn.Module) -> list[nn.Module]:
    """The transformer layers of an HFTextEncoder's encoder, input to output (BERT/RoBERTa `layer`, T5 `block`)."""
    hf = tower.transformer
    encoder = getattr(hf, "encoder", hf)
    for attr in ("layer", "block", "layers"):
        layers = getattr(encoder, attr, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def hf_feed_forward(layer: nn.Module, where: str) -> tuple[nn.Module, int]:
    """A BERT-family layer's feed-forward as one module, `intermediate.dense` -> the config's activation ->
    `output.dense` (dropout, residual and LayerNorm stay in `output`), and its input width. T5-style and other
    layers stop in one line naming `where`."""
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    dense_in, dense_out = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    act = getattr(intermediate, "intermediate_act_fn", None)
    if not (isinstance(dense_in, nn.Linear) and isinstance(dense_out, nn.Linear) and isinstance(act, nn.Module)):
        raise ConfigError(f"{where} ({type(layer).__name__}) has no BERT-style feed-forward (intermediate.dense, "
                          "an activation module, output.dense) to make sparse; choose model.moe.towers: image")
    return nn.Sequential(dense_in, act, dense_out), dense_in.in_features


def set_hf_feed_forward(layer: nn.Module, feed_forward: nn.Module) -> None:
    """Make `feed_forward` (input width -> input width) the layer's whole MLP: it takes `intermediate`'s place and
    `output.dense` becomes the identity, so `output` still adds dropout, the residual and LayerNorm."""
    layer.intermediate = feed_forward
    layer.output.dense = nn.Identity()


def set_hf_context(model: nn.Module, arch: dict[str, Any], where: str) -> None:
    """Give an HF-tower model the tokenizer's context length (open_clip reports the encoder's position count),
    checked against the positions the encoder has (RoBERTa-style ids start after the padding id)."""
    tower = hf_text_tower(model)
    if tower is None:
        return
    context = int(arch.get("text_cfg", {}).get("context_length", 77))
    config = tower.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        usable = positions - (config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0)
        if context > usable:
            raise ConfigError(f"{where}: text_cfg.context_length {context} exceeds the {usable} positions of "
                              f"{config.model_type} (max_position_embeddings {positions})")
    tower.context_length = model.context_length = context
