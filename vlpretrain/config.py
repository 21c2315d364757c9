"""One typed schema for a run: model, data, train and eval sections, loaded from YAML with `--set` overrides.

Every field below is documented by its comment; `vlpretrain info --config FILE` prints the resolved values, and the
config reference in docs/config.md is generated from the fields (`python -m vlpretrain.config docs/config.md`; a
test keeps it in step). Unknown keys, wrong types, missing required values, paths that do not exist and values out
of range (each section's `validate`, then `RunConfig.validate` for rules across sections) fail in `load_config`
before anything starts, naming the key and whether its value came from the file or a `--set` override.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import yaml

from vlpretrain import storage
from vlpretrain.errors import ConfigError, DataError

REQUIRED: Any = "???"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # marker for a value the user must give


def _path_field(default: Any = None, *, must_exist: bool = True, help: str = "") -> Any:
    return field(default=default, metadata={"path": must_exist, "help": help})


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _need(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError naming `key` unless `ok`: the one shape of every value rule below."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


# for option sections defined elsewhere (an objective's options): the same field and rule helpers
option, need = _f, _need


@dataclass
class MoEConfig:
    """Sparse Mixture-of-Experts MLP layers (0 experts means a dense model)."""

    num_experts: int = _f(0, "experts per MoE layer; 0 keeps the model dense")
    top_k: int = _f(2, "experts each token is routed to")
    layers: str | list[int] = _f("every_2", "which blocks: 'every_N', 'last_N', 'all' or a list of block indices")
    towers: Literal["image", "text", "both"] = _f("image", "towers whose blocks get MoE MLPs")
    capacity_factor: float = _f(1.25, "expert capacity while training, as a multiple of tokens*k/experts")
    eval_capacity_factor: float = _f(2.0, "expert capacity in eval mode; <=0 means no token is dropped")
    jitter: float = _f(0.0, "multiplicative jitter noise on router inputs while training")
    normalize_weights: bool = _f(True, "renormalise the top-k combine weights to sum to 1")
    batch_priority: bool = _f(False, "tokens with the highest gate fill expert capacity first")
    aux_loss_weight: float = _f(0.01, "weight of the Switch load-balancing loss")
    z_loss_weight: float = _f(0.001, "weight of the ST-MoE router z-loss")
    backend: Literal["native", "deepspeed"] = _f("native", "native layer, or deepspeed.moe for expert parallelism")
    ep_size: int = _f(1, "expert-parallel group size (deepspeed backend)")

    def validate(self, prefix: str = "model.moe.") -> None:
        """Ranges and backend rules; a dense model (0 experts) ignores the other keys."""
        _need(self.num_experts >= 0, f"{prefix}num_experts", f"must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        _need(1 <= self.top_k <= self.num_experts, f"{prefix}top_k",
              f"expected 1..{self.num_experts} (num_experts), got {self.top_k}")
        _need(0 <= self.jitter < 1, f"{prefix}jitter", f"expected 0 <= jitter < 1, got {self.jitter}")
        _need(self.capacity_factor > 0, f"{prefix}capacity_factor", f"must be > 0, got {self.capacity_factor}")
        _need(self.aux_loss_weight >= 0, f"{prefix}aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")
        _need(self.z_loss_weight >= 0, f"{prefix}z_loss_weight", f"must be >= 0, got {self.z_loss_weight}")
        _need(self.ep_size >= 1 and self.num_experts % self.ep_size == 0, f"{prefix}ep_size",
              f"must divide num_experts ({self.num_experts}), got {self.ep_size}")
        if self.backend == "native":
            _need(self.ep_size == 1, f"{prefix}ep_size", "the native backend replicates experts (ep_size 1); "
                  "use backend: deepspeed for expert parallelism")
            return
        _need(not self.batch_priority, f"{prefix}batch_priority",
              "not available with backend: deepspeed (position order)")
        _need(self.jitter in (0.0, 0.01), f"{prefix}jitter",
              f"backend deepspeed has a fixed jitter of 0.01; got {self.jitter}")
        want = self.top_k > 1
        _need(self.normalize_weights == want, f"{prefix}normalize_weights",
              f"backend deepspeed with top_k={self.top_k} "
              f"{'renormalises' if want else 'uses the raw probability'}; set it to {str(want).lower()}")


@dataclass
class ModelConfig:
    """The two towers."""

    name: str = _f("tiny-vit", "open_clip architecture name or a config in configs/models/")
    pretrained: str | None = _path_field(None, help="local checkpoint (.pt/.bin/.safetensors) to start from")
    grad_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    compile: bool = _f(False, "wrap the model in torch.compile")
    patch_dropout: float = _f(0.0, "fraction of image patches dropped in training forwards (FLIP); none in evaluation")
    lock_image: bool = _f(False, "freeze the image tower (LiT): no gradients, no optimizer state")
    lock_image_unlocked_blocks: int = _f(0, "last blocks of a locked image tower left trainable, with its head")
    lock_image_freeze_bn: bool = _f(True, "BatchNorm layers of a locked image tower keep their running statistics")
    lock_text: bool = _f(False, "freeze the text tower")
    lock_text_unlocked_blocks: int = _f(0, "last blocks of a locked text tower left trainable, with its head")
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": "sparse MoE layers"})

    def validate(self) -> None:
        _need(0 <= self.patch_dropout < 1, "model.patch_dropout",
              f"expected a fraction 0 <= p < 1, got {self.patch_dropout}")
        for tower in ("image", "text"):
            key, n = f"model.lock_{tower}_unlocked_blocks", getattr(self, f"lock_{tower}_unlocked_blocks")
            _need(n >= 0, key, f"must be >= 0, got {n}")
            _need(n == 0 or getattr(self, f"lock_{tower}"), key, f"has no effect unless model.lock_{tower} is true")
        self.moe.validate()


@dataclass
class DataConfig:
    """Training shards and how they are streamed."""

    train: str | list[str] = _f(REQUIRED, "shard pattern(s): brace patterns ({000..099}) and sorted globs (*.tar)")
    val: str | list[str] | None = _f(None, "held-out shards: validation loss and recall every eval.every steps")
    weights: list[float] | None = _f(None, "sampling weight per entry of `train` (resampled mode)")
    mode: Literal["epoch", "resampled"] = _f("epoch", "exact epochs, or sampling with replacement")
    train_num_samples: int | None = _f(None, "samples in one epoch: required in resampled mode; in epoch mode the "
                                             "epoch length when no sidecar counts the shards (they then share it "
                                             "evenly instead of being scanned)")
    missing_shards: Literal["error", "skip"] = _f("error", "shards named by data.train that do not exist: stop, or "
                                                  "leave them out (logged, and counted in metrics)")
    index: str | list[str] | None = _f(None, "indexes written by `vlpretrain index-shards --out` for shard folders "
                                             "that hold no sidecar")
    image_key: str = _f("jpg;jpeg;png;webp;bmp;gif;tiff;tif;ppm;pgm",
                        "member(s) holding the image, ';'-separated, first present wins (e.g. input.jpg)")
    text_key: str = _f("json:captions;txt", "member(s) holding the caption, ';'-separated, first present wins; "
                                            "json:FIELD reads a field of the json member (a list: one per epoch)")
    batch_size: int = _f(128, "samples per rank per micro-step")
    workers: int = _f(1, "loader worker processes per rank")
    interleave_shards: int = _f(4, "shards each loader worker reads at once, taking samples from them at random "
                                   "(mixes sorted shards); 1: one after another")
    shuffle_buffer: int = _f(2000, "samples held in the shuffle buffer (after interleaving)")
    image_size: int | None = _f(None, "input resolution; default: the model's")
    augment: bool = _f(True, "random resized crop while training")
    crop_scale: list[float] = _f([0.9, 1.0], "random resized crop scale range")
    fast_decode: bool = _f(True, "decode JPEGs with libjpeg-turbo straight into uint8 tensors and crop/resize them with "
                                 "torch's antialiased uint8 kernels (open_clip transforms; resampling within a level "
                                 "or two of PIL's); false: PIL throughout, as open_clip's transform does")
    uint8_batches: bool = _f(True, "batches leave the loader workers as uint8 pixels and the training step normalises "
                                   "them on its device (a quarter of the bytes, the same floats); false: float "
                                   "batches normalised in the workers")
    error_budget: float = _f(0.01, "fraction of bad samples tolerated before the run stops")
    seed: int = _f(0, "seed of shuffling and caption choice, combined with the epoch")

    def validate(self) -> None:
        _need(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.workers >= 0, "data.workers", f"must be >= 0, got {self.workers}")
        _need(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _need(self.interleave_shards >= 1, "data.interleave_shards",
              f"must be >= 1 (1 reads shards one after another), got {self.interleave_shards}")
        _need(self.image_size is None or self.image_size >= 1, "data.image_size",
              f"must be >= 1, got {self.image_size}")
        for key in ("fast_decode", "uint8_batches"):
            value = getattr(self, key)
            _need(isinstance(value, bool), f"data.{key}", f"expected true or false, got {value!r}")
        lo_hi = self.crop_scale
        _need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, "data.crop_scale",
              f"expected [min, max] with 0 < min <= max <= 1, got {lo_hi}")
        _need(0 <= self.error_budget <= 1, "data.error_budget", f"expected a fraction in [0, 1], got {self.error_budget}")
        _need(self.mode == "resampled" or self.weights is None, "data.weights",
              "sampling weights apply to data.mode: resampled only")
        _need(self.mode == "epoch" or self.train_num_samples is not None, "data.train_num_samples",
              "required in resampled mode")
        _need(self.train_num_samples is None or self.train_num_samples >= 1, "data.train_num_samples",
              f"must be >= 1, got {self.train_num_samples}")
        for key in ("image_key", "text_key"):
            value = getattr(self, key)
            _need(any(k.strip() for k in value.split(";")), f"data.{key}", f"names no member: {value!r}")
        if self.weights is not None:
            n = 1 if isinstance(self.train, str) else len(self.train)
            _need(len(self.weights) == n and all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                  "data.weights", f"need {n} non-negative weight(s), one per data.train entry, not all zero; "
                  f"got {self.weights}")


@dataclass
class TrainConfig:
    """Optimisation, engine and checkpoints."""

    output_dir: str = _f("runs/default", "run folder: metrics, checkpoints, plots")
    steps: int = _f(1000, "optimizer steps in the whole run")
    lr: float = _f(5e-4, "peak learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = _f(100, "linear warmup steps")
    weight_decay: float = _f(0.2, "AdamW weight decay (not on biases, norms, embeddings, temperature)")
    betas: list[float] = _f([0.9, 0.98], "AdamW betas")
    eps: float = _f(1e-6, "AdamW epsilon")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    accumulation: Literal["exact", "independent"] = _f(
        "exact", "exact: the loss over all micro-steps' samples (one extra forward each); independent: each "
        "micro-step its own contrastive batch")
    clip_grad: float = _f(1.0, "gradient norm clipping; 0 disables")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "training precision; auto: bf16 (fp32 master weights and gradients) on a GPU, fp32 on CPUs, "
        "where bf16 is slower")
    zero_stage: Literal[0, 1, 2, 3] = _f(0, "DeepSpeed ZeRO stage")
    offload_optimizer: bool = _f(False, "ZeRO optimizer state on the CPU")
    objective: str = _f("clip", "training objective (vlpretrain.objectives): clip (InfoNCE), siglip (sigmoid), "
                        "coca (contrastive + captioning, a CoCa model), distill (CLIP + a frozen teacher's logits)")
    objective_options: dict[str, Any] = _f({}, "the objective's own options (e.g. coca: caption_weight; distill: "
                                           "teacher), checked against it when the config loads")
    local_loss: bool = _f(True, "contrastive terms: each rank computes its rows against all columns")
    loss_chunk: int = _f(0, "contrastive terms: column chunk of the logit matrix; 0 computes it whole")
    unmasked_steps: int = _f(0, "last steps trained without patch dropout (FLIP's unmasked tuning)")
    seed: int = _f(0, "seed of weights and data order")
    stop_after: int = _f(0, "stop with a checkpoint after this many steps in one invocation (job slots); 0: never")
    log_every: int = _f(10, "steps between metric lines")
    save_every: int = _f(0, "steps between checkpoints; 0 only at the end")
    keep_last: int = _f(2, "checkpoints kept (locally, and in remote_dir)")
    remote_dir: str | None = _f(None, "url mirroring the run's checkpoints (s3://bucket/run, gs://..., or a "
                                      "local path such as a second disk): each one uploaded in the background, "
                                      "`latest` last; --resume latest takes it when the run folder has none")
    max_nonfinite: int = _f(5, "non-finite losses in a row that stop the run")
    progress: bool = _f(True, "a step bar on a terminal; off, or in a log file: a plain line every 30 s")
    report_to: list[Literal["tensorboard", "wandb"]] = _f(["tensorboard"],
                                                          "experiment trackers beside metrics.jsonl")
    wandb_project: str = _f("vlpretrain", "Weights & Biases project (with report_to: [wandb])")
    wandb_mode: Literal["offline", "online"] = _f("offline", "offline writes runs to output_dir/wandb for "
                                                  "`wandb sync`; online needs a network and a login")

    def validate(self) -> None:
        _need(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _need(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, "train.min_lr", f"expected 0 <= min_lr <= lr ({self.lr}), got {self.min_lr}")
        _need(0 <= self.warmup_steps <= self.steps, "train.warmup_steps",
              f"expected 0..{self.steps} (train.steps), got {self.warmup_steps}: the warmup would outlast the run")
        _need(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              f"expected [beta1, beta2], each in [0, 1), got {self.betas}")
        _need(self.eps > 0, "train.eps", f"must be > 0, got {self.eps}")
        _need(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _need(self.clip_grad >= 0, "train.clip_grad", f"must be >= 0 (0 disables), got {self.clip_grad}")
        _need(not self.offload_optimizer or self.zero_stage > 0, "train.offload_optimizer",
              "needs train.zero_stage 1, 2 or 3")
        _need(0 <= self.unmasked_steps <= self.steps, "train.unmasked_steps",
              f"expected 0..{self.steps} (train.steps), got {self.unmasked_steps}")
        _need(self.loss_chunk >= 0, "train.loss_chunk", f"must be >= 0, got {self.loss_chunk}")
        _need(self.stop_after >= 0, "train.stop_after", f"must be >= 0, got {self.stop_after}")
        _need(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _need(self.save_every >= 0, "train.save_every", f"must be >= 0, got {self.save_every}")
        _need(self.keep_last >= 1, "train.keep_last", f"must be >= 1, got {self.keep_last}")
        _need(self.max_nonfinite >= 1, "train.max_nonfinite", f"must be >= 1, got {self.max_nonfinite}")
        if self.remote_dir is not None:
            self._validate_remote_dir(self.remote_dir)
        if "wandb" in self.report_to:
            import importlib.util

            _need(importlib.util.find_spec("wandb") is not None, "train.report_to",
                  "wandb is not installed: pip install wandb (or pip install 'vlpretrain[wandb]')")

    def _validate_remote_dir(self, url: str) -> None:
        """A store fsspec can write, its backend installed; a local mirror outside the run folder (the run's
        pruning and --overwrite would otherwise reach into the mirror)."""
        try:
            storage.check_writable_url(url)
        except DataError as e:
            raise ConfigError(f"train.remote_dir: {str(e).removeprefix(f'{url}: ')}") from None
        if not storage.is_remote(url):
            mirror, run = Path(storage.local_path(url)).resolve(), Path(self.output_dir).expanduser().resolve()
            _need(mirror != run and run not in mirror.parents, "train.remote_dir",
                  f"must lie outside train.output_dir ({self.output_dir})")


@dataclass
class EvalConfig:
    """Zero-shot (and linear-probe) evaluation during and after training."""

    every: int = _f(0, "steps between evaluations; 0 only at the end")
    at_end: bool = _f(True, "evaluate once training ends")
    benchmarks: list[str] = _f([], "benchmark names from `zeroshot list`")
    languages: list[str] = _f(["en"], "languages of the zero-shot prompts (ISO 639-1, `zeroshot list --languages`): "
                              "each benchmark is evaluated in each, e.g. [en, de]")
    root: str | None = _path_field(None, help="folder holding one sub-folder per benchmark (or the benchmark itself)")
    batch_size: int = _f(256, "images per evaluation batch")
    max_images: int | None = _f(None, "cap on images per benchmark (quick checks)")
    linear_probe: bool = _f(False, "also fit a linear probe at the end")
    val_samples: int = _f(2048, "validation samples (data.val) per evaluation, split across ranks")
    workers: int = _f(0, "evaluation loader workers")

    def validate(self) -> None:
        _need(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _need(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.max_images is None or self.max_images >= 1, "eval.max_images",
              f"must be >= 1, got {self.max_images}")
        _need(self.workers >= 0, "eval.workers", f"must be >= 0, got {self.workers}")
        _need(self.val_samples >= 1, "eval.val_samples", f"must be >= 1, got {self.val_samples}")
        _need(len(self.languages) >= 1, "eval.languages", "must name at least one language (English: [en])")
        _need(len(set(self.languages)) == len(self.languages), "eval.languages",
              f"names a language twice: {self.languages}")


@dataclass
class RunConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the towers"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})

    def validate(self) -> None:
        """Every section's own rules, then the rules that span sections; `load_config` calls this once."""
        for section in (self.model, self.data, self.train, self.eval):
            section.validate()
        _need(self.train.unmasked_steps == 0 or self.model.patch_dropout > 0, "train.unmasked_steps",
              "has no effect without model.patch_dropout")
        moe = self.model.moe
        _need(not (moe.num_experts > 0 and moe.backend == "deepspeed" and self.train.zero_stage == 3),
              "model.moe.backend", "DeepSpeed's MoE does not run under ZeRO-3 (train.zero_stage=3); "
              "use backend: native, or train.zero_stage 0-2")
        _need(not (self.model.compile and self.train.zero_stage == 3), "model.compile",
              "torch.compile cannot trace the model under ZeRO-3 (train.zero_stage=3), whose parameters are empty "
              "placeholders between gathers; use train.zero_stage 0-2 with compile, or model.compile false")


# ---------------------------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` checked against `tp` (ints widen to floats); raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where + ".")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


# Keys that were renamed: configs (and checkpoints) written with the old name keep working.
RENAMED = {"data.samples_per_epoch": "data.train_num_samples", "train.loss": "train.objective"}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        if f"{section}." == prefix and key in values:
            new_key = new.rpartition(".")[2]
            if new_key in values:
                raise ConfigError(f"{old}: renamed to {new}; give only the new name")
            values = {**{k: v for k, v in values.items() if k != key}, new_key: values[key]}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.5)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], f"{prefix}{f.name}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]) and not dataclasses.is_dataclass(v):
            setattr(obj, f.name, _build(hints[f.name], {}, f"{prefix}{f.name}."))
    return obj


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """A dataclass section of options (such as an objective's) from plain values, with this schema's checks:
    unknown keys ("did you mean"), types, required values, each named `prefix` + key."""
    obj = _build(cls, values, prefix)
    _check(obj, prefix)
    return obj


def _check(obj: Any, prefix: str) -> None:
    """Required values present and existing paths exist."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            _check(v, key + ".")
        elif v is REQUIRED:
            raise ConfigError(f"{key}: required value missing")
        elif f.metadata.get("path") and v is not None:
            p = Path(os.path.expanduser(v))
            if not p.exists():
                raise ConfigError(f"{key}: path does not exist: {v}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config from YAML (or start from defaults), apply `a.b=c` overrides, validate everything."""
    values: dict[str, Any] = {}
    src = "<defaults>"
    if path is not None:
        src = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{src}: config file does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{src}: top level must be a mapping of sections")
    overridden: dict[str, str] = {}
    for text in overrides or []:
        keys, value = _parse_override(text)
        overridden[".".join(keys)] = text
        node = values
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    try:
        cfg = _build(RunConfig, values, "")
        _check(cfg, "")
        cfg.validate()
        for check in _section_checks():
            check(cfg)
    except ConfigError as e:
        # name where the bad value came from: a --set override, or the file
        key = str(e).split(":", 1)[0].split("[", 1)[0]
        origin = f"--set {overridden[key]}" if key in overridden else src
        raise ConfigError(f"{origin}: {e}") from None
    return cfg


# Options whose schema lives above this module (an objective's `train.objective_options`) are checked by functions
# their packages name under this entry point group: the registry is read by name, so config imports none of them.
CHECKS_ENTRY_POINT_GROUP = "vlpretrain.config_checks"


def _section_checks() -> list[Any]:
    """The installed checks of option sections defined elsewhere, each `check(cfg)` raising ConfigError."""
    return [ep.load() for ep in sorted(entry_points(group=CHECKS_ENTRY_POINT_GROUP), key=lambda ep: ep.name)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML/JSON output and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain nested dict (e.g. a config stored next to a checkpoint)."""
    try:
        return _build(RunConfig, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf of the schema, in order: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += reference(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "required" if default is REQUIRED else repr(default)
        rows.append((f"{prefix}{f.name}", _type_name(tp), shown, f.metadata.get("help", "")))
    return rows


def reference_markdown(width: int = 120) -> str:
    """The config reference as markdown (docs/config.md carries this exact text): a heading per section, a list
    item per key, wrapped to `width` characters."""
    lines: list[str] = []
    section = None
    for key, tp, default, help_ in reference():
        here = key.rpartition(".")[0]
        if here != section:
            lines += ([""] if lines else []) + [f"### `{here}`", ""]
            section = here
        item = f"- `{key}` ({tp.replace('|', '/')}, default `{default}`): {help_}"
        lines += textwrap.wrap(item, width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


_BEGIN, _END = "<!-- config reference: begin -->", "<!-- config reference: end -->"


def update_reference(path: str | os.PathLike) -> None:
    """Rewrite the config reference between the markers of a markdown file
    (`python -m vlpretrain.config docs/config.md`)."""
    text = Path(path).read_text()
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    Path(path).write_text(f"{head}{_BEGIN}\n{reference_markdown()}\n{_END}{tail}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:
        update_reference(sys.argv[1])
    else:
        print(reference_markdown())
