"""Adapted zero-shot heads: open_clip's text tower run with learned prompt offsets or (IA)^3 scaling vectors.

An adapter is a few small tensors applied to a frozen model's text tower; the head is still the prompt ensemble
(every template filled with every class name, embedded, normalised, averaged per class), so an adapter whose
tensors are at their initial values gives exactly the zero-shot head.

- "prompt" (prompt tuning, Lester et al. 2021; CoOp, Zhou et al. 2022): a learned offset added to the token
  embeddings of the first `n_ctx` tokens after the start token of every prompt (the words in front of the class
  name in "a photo of a {c}."), one set per template shared by all classes, or one per class and template.
  Offsets start at zero, so each template's context starts as its hand-written words.
- "ia3" ((IA)^3, Liu et al. 2022): learned vectors that rescale the attention keys and values and the MLP's hidden
  activations of every text block, starting at one. They are applied by scaling the rows of `in_proj_weight` and
  the columns of `mlp.c_proj.weight` through `torch.func.functional_call`: the same function as scaling the
  activations, while the model's own parameters are never written.
- "linear" (a zero-shot-initialised linear head, as CLAP, Silva-Rodriguez et al. 2024, and LP++, Huang et al. 2024):
  the (embed_dim, classes) head itself, starting at the zero-shot ensemble head and trained on the shots' image
  features with a penalty that keeps it near that head (`zeroshot.fewshot.fit_linear`); the text tower only gives
  its starting point.
- "tip" (Tip-Adapter, Zhang et al. 2022): training-free. A cache whose keys are the shots' normalised image
  features and whose values are their one-hot labels; an image feature f scores
  `logit_scale * f W + alpha * exp(-beta * (1 - f keys^T)) values`, W the zero-shot head. alpha and beta are
  tensors of the adapter; the text tower runs as it is.

Adapter files are safetensors (no pickle) whose metadata names the method, benchmark, class count and the digests
of the model weights and of the prompts' token ids; `Adapter.check` refuses a file made for anything else.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.models.openclip import open_clip
from zeroshot.classifier import ClassName, Template, default_tokenizer, ensemble_head, expand_prompts
from zeroshot.features import weights_digest

Method = Literal["prompt", "ia3", "tip", "linear"]
METHODS: tuple[str, ...] = ("prompt", "ia3", "tip", "linear")
ADAPTER_FORMAT = "vlpretrain-adapter-v1"
_TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")


def check_text_tower(model: nn.Module, method: str) -> None:
    """Raise ConfigError unless `model` has the open_clip text tower (and, for ia3, the block layout) adapters use."""
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    missing = [name for name in _TEXT_TOWER if not hasattr(model, name)]
    if missing:
        raise ConfigError(f"adapters need open_clip's CLIP text tower; the model has no {', '.join(missing)}")
    if method == "ia3":
        for i, block in enumerate(model.transformer.resblocks):
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or not hasattr(
                    getattr(block, "mlp", None), "c_proj"):
                raise ConfigError(f"ia3: text block {i} is not open_clip's standard block (nn.MultiheadAttention "
                                  "attn and an mlp with c_proj); an MoE text tower cannot take (IA)^3 vectors")


@dataclass(frozen=True)
class PromptSet:
    """The token ids of a prompt ensemble, with each prompt's class and template."""

    tokens: torch.Tensor  # [P, context_length] int64
    class_ids: torch.Tensor  # [P]
    template_ids: torch.Tensor  # [P]
    num_classes: int
    num_templates: int

    @classmethod
    def build(cls, tokenizer, classnames: Sequence[ClassName], templates: Sequence[Template]) -> PromptSet:
        """Tokenise every prompt of `templates` x `classnames` (see `zeroshot.classifier.expand_prompts`)."""
        if not classnames or not templates:
            raise ConfigError("adapters need at least one class name and one template")
        prompts, class_ids, template_ids = expand_prompts(classnames, templates)
        return cls(tokenizer(prompts).long(), torch.tensor(class_ids), torch.tensor(template_ids), len(classnames),
                   len(templates))

    def digest(self) -> str:
        """SHA-256 of the token ids and their classes and templates: what an adapter's tensors are tied to."""
        h = hashlib.sha256()
        for t in (self.tokens, self.class_ids, self.template_ids):
            h.update(f"{tuple(t.shape)}|".encode())
            h.update(t.long().contiguous().numpy().tobytes())
        return h.hexdigest()


def prompt_set(model: nn.Module, tokenizer, classnames: Sequence[ClassName],
               templates: Sequence[Template]) -> PromptSet:
    """The PromptSet of a benchmark's class names and templates, with open_clip's default tokenizer if none."""
    return PromptSet.build(tokenizer or default_tokenizer(model), classnames, templates)


def initial_tensors(model: nn.Module, method: str, prompts: PromptSet, *, n_ctx: int = 4,
                    class_specific: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors that reproduce the zero-shot head: zero prompt offsets, (IA)^3 scales of one, an
    empty Tip-Adapter cache (alpha 0), or the zero-shot head itself (linear)."""
    check_text_tower(model, method)
    if method == "linear":
        with torch.no_grad():
            return {"weight": adapted_head(model, "tip", {}, prompts, batch_size=256).detach().cpu()}
    if method == "tip":
        dim = image_embed_dim(model)
        return {"keys": torch.zeros(0, dim), "values": torch.zeros(0, prompts.num_classes),
                "alpha": torch.zeros(1), "beta": torch.ones(1)}
    if method == "prompt":
        length = prompts.tokens.shape[1]
        if not 1 <= n_ctx <= length - 2:
            raise ConfigError(f"n_ctx: expected 1..{length - 2} (the text context is {length} tokens), got {n_ctx}")
        groups = prompts.num_templates * (prompts.num_classes if class_specific else 1)
        width = model.token_embedding.weight.shape[1]
        return {"ctx": torch.zeros(groups, n_ctx, width)}
    out = {}
    for i, block in enumerate(model.transformer.resblocks):
        out[f"k.{i}"] = torch.ones(block.attn.embed_dim)
        out[f"v.{i}"] = torch.ones(block.attn.embed_dim)
        out[f"mlp.{i}"] = torch.ones(block.mlp.c_proj.weight.shape[1])
    return out


def image_embed_dim(model: nn.Module) -> int:
    """The width of the model's image features (the text projection's output)."""
    projection = model.text_projection
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]


def tip_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor | float,
               tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tip-Adapter logits [N, classes]: `logit_scale * f head + alpha * exp(-beta * (1 - f keys^T)) values`, f the
    normalised `features`, `head` the zero-shot (embed_dim, classes) head."""
    f = F.normalize(features.float(), dim=-1)
    keys, values = tensors["keys"].to(f), tensors["values"].to(f)
    alpha, beta = tensors["alpha"].to(f).reshape(()), tensors["beta"].to(f).reshape(())
    affinity = torch.exp(-beta * (1 - f @ keys.T))
    return logit_scale * f @ head.to(f) + alpha * affinity @ values


def _end_positions(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each prompt's pooled position (its end-of-text token), as open_clip's text pooling finds it."""
    eos = getattr(model, "text_eos_id", None)
    if getattr(model, "text_pool_type", "argmax") == "eos" and eos is not None:
        return (tokens == eos).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def _prompt_offsets(model: nn.Module, ctx: torch.Tensor, tokens: torch.Tensor, class_ids: torch.Tensor,
                    template_ids: torch.Tensor, num_templates: int) -> torch.Tensor:
    """Offsets [P, L, width] for the token embeddings: each prompt's context rows at positions 1..n_ctx."""
    per_class = len(ctx) != num_templates
    groups = class_ids * num_templates + template_ids if per_class else template_ids
    n_ctx, length = ctx.shape[1], tokens.shape[1]
    # Only word positions before the end-of-text token: a short prompt's pooled token stays its own embedding.
    words = torch.arange(1, n_ctx + 1, device=tokens.device)[None] < _end_positions(model, tokens)[:, None]
    rows = ctx[groups.to(ctx.device)] * words[..., None].to(ctx)
    return F.pad(rows, (0, 0, 1, length - 1 - n_ctx))


def _ia3_overrides(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replacement text-block parameters that apply the (IA)^3 scales (names relative to `model.transformer`).

    Scaling keys by l_k is scaling the key rows of the input projection (weight and bias), likewise for values;
    scaling the MLP's hidden activation by l_ff is scaling the columns of its output projection.
    """
    out = {}
    for i, block in enumerate(model.transformer.resblocks):
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        scale = torch.cat([torch.ones_like(tensors[f"k.{i}"]), tensors[f"k.{i}"], tensors[f"v.{i}"]]).to(w)
        out[f"resblocks.{i}.attn.in_proj_weight"] = w * scale[:, None]
        if b is not None:
            out[f"resblocks.{i}.attn.in_proj_bias"] = b * scale
        proj = block.mlp.c_proj.weight
        out[f"resblocks.{i}.mlp.c_proj.weight"] = proj * tensors[f"mlp.{i}"].to(proj)[None, :]
    return out


def encode_tokens(model: nn.Module, tokens: torch.Tensor, *, offsets: torch.Tensor | None = None,
                  overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` (unnormalised), with `offsets` added to the token embeddings and
    `overrides` replacing text-transformer parameters for this call only."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast)
    if offsets is not None:
        x = x + offsets.to(cast)
    x = x + model.positional_embedding.to(cast)
    if overrides:
        x = functional_call(model.transformer, overrides, (x,), {"attn_mask": model.attn_mask}, strict=False)
    else:
        x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


def adapted_head(model: nn.Module, method: str, tensors: dict[str, torch.Tensor], prompts: PromptSet, *,
                 batch_size: int | None = None) -> torch.Tensor:
    """The float32 (embed_dim, classes) head of the prompt ensemble under the adapter `tensors`, on the model's
    device; differentiable in `tensors`. `batch_size` embeds that many prompts at a time (all at once if None)."""
    device = model.token_embedding.weight.device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if method == "linear":  # the head is the adapter's own tensor
        return tensors["weight"].float()
    if method == "tip":  # the cache acts on image features; the head is the zero-shot ensemble
        tensors = {}
    overrides = _ia3_overrides(model, tensors) if method == "ia3" else None
    n = len(prompts.tokens)
    step = batch_size or n
    sums = None
    for start in range(0, n, step):
        rows = slice(start, start + step)
        tokens = prompts.tokens[rows].to(device)
        offsets = None
        if method == "prompt":
            offsets = _prompt_offsets(model, tensors["ctx"], tokens, prompts.class_ids[rows].to(device),
                                      prompts.template_ids[rows].to(device), prompts.num_templates)
        emb = F.normalize(encode_tokens(model, tokens, offsets=offsets, overrides=overrides).float(), dim=-1)
        part = emb.new_zeros(prompts.num_classes, emb.shape[1]).index_add(0, prompts.class_ids[rows].to(device), emb)
        sums = part if sums is None else sums + part
    assert sums is not None
    return ensemble_head(sums, torch.bincount(prompts.class_ids, minlength=prompts.num_classes).to(device))


@dataclass
class Adapter:
    """Learned vectors for one model's text tower on one benchmark's prompts, with what they were fitted for."""

    method: str
    tensors: dict[str, torch.Tensor]
    benchmark: str
    num_classes: int
    model_digest: str  # weights_digest(model, scope="model") of the model it was fitted on
    prompts_digest: str  # PromptSet.digest() of the benchmark's prompts under the tokenizer used
    info: dict[str, str] = field(default_factory=dict)  # settings and fit summary (shots, steps, seed, ...)

    @property
    def language(self) -> str:
        """The language of the prompts it was fitted on (files written before languages existed: English)."""
        return self.info.get("language", "en")

    def head(self, model: nn.Module, prompts: PromptSet, *, batch_size: int | None = 256) -> torch.Tensor:
        """The adapted (embed_dim, classes) head, computed without gradients."""
        with torch.no_grad():
            return adapted_head(model, self.method, self.tensors, prompts, batch_size=batch_size)

    def logits(self, features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        """Logits [N, classes] of image `features` under this adapter, `head` being `self.head(...)`."""
        if self.method == "tip":
            return tip_logits(features, head, logit_scale, self.tensors)
        return logit_scale * F.normalize(features.float(), dim=-1) @ head.float().to(features.device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tensors and metadata as safetensors, atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.info, "format": ADAPTER_FORMAT, "method": self.method, "benchmark": self.benchmark,
                "num_classes": str(self.num_classes), "model_digest": self.model_digest,
                "prompts_digest": self.prompts_digest}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Adapter:
        """Read an adapter file (safetensors only), naming the file when it is missing or not an adapter."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: adapter file does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a safetensors adapter file ({e})") from None
        required = ("method", "benchmark", "num_classes", "model_digest", "prompts_digest")
        if meta.get("format") != ADAPTER_FORMAT or any(k not in meta for k in required):
            raise CheckpointError(f"{path}: not an adapter file (expected metadata format {ADAPTER_FORMAT})")
        if meta["method"] not in METHODS:
            raise CheckpointError(f"{path}: unknown adapter method {meta['method']!r}")
        info = {k: v for k, v in meta.items() if k not in (*required, "format")}
        return cls(meta["method"], tensors, meta["benchmark"], int(meta["num_classes"]), meta["model_digest"],
                   meta["prompts_digest"], info)

    def check(self, model: nn.Module, benchmark: str, prompts: PromptSet, source: str | os.PathLike = "adapter",
              ) -> None:
        """Raise CheckpointError (one line naming `source`) unless this adapter fits `model` and `benchmark`."""
        if benchmark != self.benchmark or prompts.num_classes != self.num_classes:
            raise CheckpointError(f"{source}: adapter is for benchmark {self.benchmark} ({self.num_classes} "
                                  f"classes), not {benchmark} ({prompts.num_classes} classes)")
        digest = weights_digest(model, scope="model")
        if digest != self.model_digest:
            raise CheckpointError(f"{source}: adapter was fitted on other model weights (digest "
                                  f"{self.model_digest[:12]}, this model's {digest[:12]})")
        if prompts.digest() != self.prompts_digest:
            raise CheckpointError(f"{source}: adapter was fitted on other prompts for {benchmark} (templates, class "
                                  "names or tokenizer differ)")
        check_text_tower(model, self.method)
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        if self.method == "prompt":
            ctx = shapes.get("ctx", ())
            n_ctx = ctx[1] if len(ctx) == 3 else 0
            wanted = {"ctx": (ctx[0] if ctx and ctx[0] == prompts.num_templates * prompts.num_classes
                              else prompts.num_templates, n_ctx, model.token_embedding.weight.shape[1])}
            fits = 1 <= n_ctx <= prompts.tokens.shape[1] - 2
        elif self.method == "tip":
            n = shapes.get("keys", (0,))[0]
            wanted = {"keys": (n, image_embed_dim(model)), "values": (n, prompts.num_classes), "alpha": (1,),
                      "beta": (1,)}
            fits = True
        elif self.method == "linear":
            wanted = {"weight": (image_embed_dim(model), prompts.num_classes)}
            fits = True
        else:
            wanted = {k: tuple(v.shape) for k, v in initial_tensors(model, "ia3", prompts).items()}
            fits = True
        if shapes != wanted or not fits:
            raise CheckpointError(f"{source}: adapter tensors {shapes} do not fit this model's text tower")
