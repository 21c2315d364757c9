"""Zero-shot heads from prompt ensembles, and ad hoc classification of a user's own images.

The head of a class is the mean of its L2-normalised prompt embeddings (every template filled with the class name,
or with each of its synonyms, or the class's own prompts where templates are class-specific, as CuPL's), normalised
again: the CLIP paper's ensembling in embedding space. Heads can be
cached on disk, keyed by a digest of the model weights, the tokenizer, the class names and the templates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlpretrain.errors import ConfigError
from vlpretrain.models.hf_text import hf_text_tower
from vlpretrain.models.openclip import open_clip
from vlpretrain.progress import progress as progress_bar
from vlpretrain.stopping import StopCheck, check_stop
from zeroshot.features import encode_images, eval_mode, resolve_device, weights_digest

Template = str | Callable[[str], str]
Templates = Sequence[Template] | Mapping[str, Sequence[str]]  # shared templates, or each class name's own prompts
ClassName = str | Sequence[str]  # a name, or synonyms whose prompts are averaged together (CLIP's FER2013 list)

BPE_VOCAB = 49408  # tokens of open_clip's English BPE tokenizer (SimpleTokenizer)
_DEFAULTS = Path(__file__).resolve().parent / "assets" / "default_templates.json"
DEFAULT_TEMPLATES: tuple[str, ...] = tuple(json.loads(_DEFAULTS.read_text())["templates"])


def fill(template: Template, classname: str) -> str:
    """The prompt of `template` for one class: `{c}` (or a bare `{}`) replaced by the name, or a callable's result."""
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ConfigError(f"template {template!r} has no {{c}} placeholder for the class name")


def default_tokenizer(model: nn.Module):
    """open_clip's BPE tokenizer at the model's text context length (works offline); a Hugging Face text tower, or
    a text transformer of another vocabulary size, has its own tokenizer, which the caller must pass
    (vlpretrain.models.get_tokenizer of its config)."""
    if hf_text_tower(model) is not None:
        raise ConfigError("this model's text tower is a Hugging Face encoder: pass its tokenizer "
                          "(vlpretrain.models.get_tokenizer(model config)), not open_clip's default")
    embedding = getattr(getattr(model, "text", model), "token_embedding", None)
    if embedding is not None and embedding.num_embeddings != BPE_VOCAB:
        raise ConfigError(f"this model's text vocabulary has {embedding.num_embeddings:,} tokens, not the "
                          f"{BPE_VOCAB:,} of open_clip's BPE tokenizer: pass its tokenizer "
                          "(vlpretrain.models.get_tokenizer(model config), e.g. the one its text_cfg.hf_tokenizer_name "
                          "names)")
    ctx = getattr(model, "context_length", None)
    if ctx is None and getattr(model, "positional_embedding", None) is not None:
        ctx = model.positional_embedding.shape[0]
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(ctx or 77))


def expand_prompts(classnames: Sequence[ClassName],
                   templates: Templates) -> tuple[list[str], list[int], list[int]]:
    """Every prompt of the ensemble with its class and template index, class by class (synonyms share both).

    Class-specific prompts (a mapping from class name to its prompts, CuPL's form) are used as they are, numbered
    in their own list."""
    prompts, class_ids, template_ids = [], [], []
    for i, c in enumerate(classnames):
        for name in ([c] if isinstance(c, str) else c):
            if isinstance(templates, Mapping):
                if name not in templates:
                    raise ConfigError(f"templates: no class-specific prompts for class {name!r}")
                filled = list(templates[name])
            else:
                filled = [fill(t, name) for t in templates]
            prompts += filled
            class_ids += [i] * len(filled)
            template_ids += list(range(len(filled)))
    return prompts, class_ids, template_ids


def ensemble_head(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The (embed_dim, classes) head from each class's sum of L2-normalised prompt embeddings and prompt count."""
    return F.normalize(sums / counts.unsqueeze(1).to(sums), dim=-1).T.contiguous()


def _cache_file(cache_dir: str | os.PathLike, model: nn.Module, tokenizer, classnames: Sequence[ClassName],
                templates: Templates) -> Path:
    listed = ({k: list(v) for k, v in templates.items()} if isinstance(templates, Mapping) else list(templates))
    key = {"weights": weights_digest(model, scope="model"), "tokenizer": [type(tokenizer).__name__,
                                                           getattr(tokenizer, "context_length", None)],
           "classnames": [c if isinstance(c, str) else list(c) for c in classnames], "templates": listed}
    digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()
    return Path(cache_dir) / f"head-{digest}.pt"


def text_batches(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                 device: str | torch.device | None = None,
                 should_stop: StopCheck | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start index, float32 text features [batch, D] on `device`, not normalised) for `texts`, `batch_size` at a
    time: the one text-encoding pass of zeroshot (heads average them, retrieval keeps them); `should_stop` is asked
    before each batch (see `encode_images`)."""
    device = resolve_device(device, model)
    tokenizer = tokenizer or default_tokenizer(model)
    model.to(device)
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            check_stop(should_stop)
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            yield start, model.encode_text(tokens).float()


def encode_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                 device: str | torch.device | None = None, progress: bool = False,
                 should_stop: StopCheck | None = None) -> torch.Tensor:
    """Float32 text features [len(texts), D] (not normalised) on the CPU, encoded on `device`."""
    feats = []
    with progress_bar(len(texts), "texts", "text", enabled=progress) as bar:
        for _, emb in text_batches(model, tokenizer, texts, batch_size=batch_size, device=device,
                                   should_stop=should_stop):
            feats.append(emb.cpu())
            bar.update(len(emb))
    if not feats:
        raise ConfigError("encode_texts needs at least one text")
    return torch.cat(feats)


def build_classifier(model: nn.Module, tokenizer, classnames: Sequence[ClassName], templates: Templates, *,
                     batch_size: int = 256, device: str | torch.device | None = None,
                     cache_dir: str | os.PathLike | None = None, should_stop: StopCheck | None = None) -> torch.Tensor:
    """The zero-shot head, a float32 (embed_dim, classes) tensor on `device` (default: the model's).

    `templates` are shared templates with `{c}`, or a mapping from each class name to its own prompts (CuPL's
    form). Prompts are embedded `batch_size` at a time. With `cache_dir`, a head built before for the same weights,
    tokenizer, class names and templates is read back instead (not when a template is a callable, which has no
    stable identity). The model is moved to `device` and left in the mode it was in.
    """
    if not classnames or not templates:
        raise ConfigError("build_classifier needs at least one class name and one template")
    device = resolve_device(device, model)
    tokenizer = tokenizer or default_tokenizer(model)
    cache = None
    if cache_dir is not None and (isinstance(templates, Mapping) or all(isinstance(t, str) for t in templates)):
        cache = _cache_file(cache_dir, model, tokenizer, classnames, templates)
        if cache.is_file():
            return torch.load(cache, map_location=device, weights_only=True)["head"]
    prompts, owners, _ = expand_prompts(classnames, templates)
    sums = None
    for start, emb in text_batches(model, tokenizer, prompts, batch_size=batch_size, device=device,
                                   should_stop=should_stop):
        if sums is None:
            sums = torch.zeros(len(classnames), emb.shape[1], device=device)
        sums.index_add_(0, torch.tensor(owners[start:start + len(emb)], device=device), F.normalize(emb, dim=-1))
    assert sums is not None
    head = ensemble_head(sums, torch.bincount(torch.tensor(owners, device=device), minlength=len(classnames)))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        torch.save({"head": head.cpu()}, tmp)
        os.replace(tmp, cache)
    return head


def _as_batch(images, transform: Callable | None) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.ndim == 3 else images
    if isinstance(images, Image.Image):
        images = [images]
    if transform is None:
        raise ConfigError("classify: PIL images need a transform (none given and none could be built)")
    return torch.stack([transform(im.convert("RGB")) for im in images])


def classify(model: nn.Module, images, classnames: Sequence[ClassName], templates: Sequence[Template] | None = None,
             tokenizer=None, transform: Callable | None = None, *, device: str | torch.device | None = None,
             batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, classes) for PIL images (one or a list) or preprocessed image tensors.

    PIL images go through `transform` (default: the model's evaluation preprocessing); tensors are used as
    they are. Templates default to the 7 ImageNet prompts the CLIP authors selected. Probabilities are the
    softmax of the model's scaled cosine logits, or for a model with a logit bias (SigLIP) the per-class sigmoid.
    """
    if transform is None and not isinstance(images, torch.Tensor):
        from vlpretrain.models import image_transform

        transform = image_transform(model, train=False)
    device = resolve_device(device, model)
    head = build_classifier(model, tokenizer, classnames, templates or DEFAULT_TEMPLATES, device=device)
    batch = _as_batch(images, transform)
    unlabelled = [(chunk, torch.zeros(len(chunk))) for chunk in batch.split(batch_size)]
    feats, _ = encode_images(model, unlabelled, device=device)
    feats = F.normalize(feats.to(device), dim=-1)
    with eval_mode(model):
        scale = model.logit_scale.exp().float().reshape(())
        logits = scale * feats @ head
        bias = getattr(model, "logit_bias", None)
        if bias is not None:
            return torch.sigmoid(logits + bias.float().reshape(()))
        return logits.softmax(dim=-1)
