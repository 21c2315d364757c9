"""Few-shot adaptation of zero-shot heads: learned prompts, (IA)^3 vectors or a Tip-Adapter cache, towers frozen.

`adapt` takes k labelled training images per class of a benchmark (seeded, as the few-shot probe draws them), their
frozen image features (from the probe's feature cache), and fits an adapter (`zeroshot.adapters`) by cross-entropy of
the model's scaled cosine logits between those features and the adapted prompt-ensemble head. Training starts from
the zero-shot head (zero steps give it exactly); AdamW's decoupled weight decay pulls the learned change back towards
it. With two or more shots, a stratified part of the shots is held out to pick the number of steps (early stopping),
then the adapter is fitted again on all shots for that many steps, as the probe refits on train + validation.
Early stopping needs `min_val_per_class` held-out shots of every class: on fewer (one image per class at 4 shots)
the validation top-1 is too coarse to choose a step, and the fit runs `steps` steps.

"tip" (Tip-Adapter) trains nothing: its cache is the shots' features and labels, and its alpha and beta are picked
on a grid by leave-one-out accuracy over the shots (each shot scored by the cache of the others); with one shot
per class nothing can be held out and `tip_alpha` / `tip_beta` are used.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.errors import ConfigError
from zeroshot.adapters import Adapter, PromptSet, adapted_head, check_text_tower, initial_tensors, prompt_set
from zeroshot.datasets import get_benchmark
from zeroshot.features import resolve_device, weights_digest
from zeroshot.logistic import few_shot_indices, stratified_split
from zeroshot.metrics import classification_metrics
from zeroshot.probe import split_features
from zeroshot.prompts import Source, benchmark_prompts

# Adam step sizes that suit each parametrisation: prompt offsets live on the scale of token embeddings, (IA)^3
# scales around 1.
DEFAULT_LR = {"prompt": 2e-3, "ia3": 1e-2}


@dataclass(frozen=True)
class AdaptConfig:
    """Hyperparameters of few-shot adaptation; the defaults are those docs/zeroshot.md states."""

    steps: int = 200  # most optimizer steps (early stopping may choose fewer)
    lr: float | None = None  # AdamW learning rate; None: DEFAULT_LR of the method
    weight_decay: float = 0.01  # decoupled decay of the learned change, towards the zero-shot head
    n_ctx: int = 4  # prompt: context tokens after the start token that get learned offsets
    class_specific: bool = False  # prompt: one context per class and template instead of one per template
    batch_size: int = 256  # training images per step (all of them when fewer)
    val_fraction: float = 0.25  # share of the shots held out for early stopping; 0 turns it off
    eval_every: int = 10  # steps between validation checks
    patience: int = 5  # checks without a better validation score before stopping
    refit: bool = True  # after early stopping, fit again on all shots for the chosen number of steps
    min_val_per_class: int = 2  # held-out shots per class needed for early stopping; fewer: run all steps
    tip_alpha: float = 1.0  # tip, one shot: weight of the cache logits (Tip-Adapter's default)
    tip_beta: float = 5.5  # tip, one shot: sharpness of the cache affinity (Tip-Adapter's default)

    def __post_init__(self) -> None:
        for name in ("steps", "n_ctx", "batch_size", "eval_every", "patience", "min_val_per_class"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ConfigError(f"{name}: expected an integer >= {0 if name == 'steps' else 1}, got {value!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: expected a positive number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        for name in ("tip_alpha", "tip_beta"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")

    def lr_for(self, method: str) -> float:
        """The learning rate used for `method`."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(method, 0.0)

    def as_info(self, method: str) -> dict[str, str]:
        """The settings as adapter-file metadata strings."""
        out = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        out["lr"] = str(self.lr_for(method))
        return out


@dataclass(frozen=True)
class Fit:
    """The tensors of one adapter fit, the step they are from, and the validation checks made on the way."""

    tensors: dict[str, torch.Tensor]
    steps: int
    val_top1: float | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val top1, val loss)


@dataclass(frozen=True)
class AdaptResult:
    """What `adapt` returns: the fitted adapter and its test metrics (results-file keys)."""

    adapter: Adapter
    metrics: dict[str, float]

    @property
    def task(self) -> str:
        """The results-file task name: adapt_prompt, adapt_ia3 or adapt_tip."""
        return task_name(self.adapter.method)


def task_name(method: str) -> str:
    """The results-file task of an adapter method."""
    return f"adapt_{method}"


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the block, then the model's previous mode and flags.

    Gradients still flow through the model to the adapter's tensors; only the model's own weights stay out of it.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _logit_scale(model: nn.Module) -> torch.Tensor:
    return model.logit_scale.detach().exp().float().reshape(())


def _score(model: nn.Module, method: str, tensors: dict[str, torch.Tensor], prompts: PromptSet, x: torch.Tensor,
           y: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of the adapted head on normalised features `x`."""
    with torch.no_grad():
        logits = _logit_scale(model) * x @ adapted_head(model, method, tensors, prompts)
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def fit_adapter(model: nn.Module, method: str, prompts: PromptSet, train_x: torch.Tensor, train_y: torch.Tensor, *,
                config: AdaptConfig | None = None, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                steps: int | None = None, seed: int = 0) -> Fit:
    """Fit adapter tensors on image features `train_x` (unnormalised is fine) with labels `train_y`.

    Runs `steps` (default `config.steps`) AdamW steps from the zero-shot initialisation. With `val`, the head is
    scored on it at step 0 and every `eval_every` steps; training stops after `patience` checks without a better
    score (accuracy, then lower loss) and the best checked tensors are returned.
    """
    cfg = config or AdaptConfig()
    steps = cfg.steps if steps is None else steps
    check_text_tower(model, method)
    device = model.token_embedding.weight.device
    x = F.normalize(train_x.float(), dim=-1).to(device)
    y = train_y.long().to(device)
    start = {k: v.to(device) for k, v in
             initial_tensors(model, method, prompts, n_ctx=cfg.n_ctx, class_specific=cfg.class_specific).items()}
    # The learned change from the zero-shot tensors: weight decay on it pulls towards the zero-shot head.
    delta = {k: torch.zeros_like(v, requires_grad=True) for k, v in start.items()}
    opt = torch.optim.AdamW(list(delta.values()), lr=cfg.lr_for(method), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    scale = _logit_scale(model)

    def current() -> dict[str, torch.Tensor]:
        return {k: start[k] + delta[k] for k in start}

    with frozen(model):
        if val is not None:
            vx = F.normalize(val[0].float(), dim=-1).to(device)
            vy = val[1].long().to(device)
        best: tuple[float, float] | None = None
        best_step, best_tensors, history, stale = 0, {k: v.clone() for k, v in start.items()}, [], 0
        order = torch.empty(0, dtype=torch.long)
        for step in range(steps + 1):
            if val is not None and (step % cfg.eval_every == 0 or step == steps):
                acc, loss = _score(model, method, current(), prompts, vx, vy)
                history.append((step, acc, loss))
                if best is None or (acc, -loss) > best:
                    best, best_step, stale = (acc, -loss), step, 0
                    best_tensors = {k: v.detach().clone() for k, v in current().items()}
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
            if step == steps:
                break
            if len(order) < min(cfg.batch_size, len(y)):  # a fresh shuffle of the shots once they are used up
                order = torch.cat([order, torch.randperm(len(y), generator=gen)])
            rows, order = order[:cfg.batch_size].to(device), order[cfg.batch_size:]
            logits = scale * x[rows] @ adapted_head(model, method, current(), prompts)
            loss = F.cross_entropy(logits, y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if val is None:
        return Fit({k: v.detach().clone() for k, v in current().items()}, steps)
    assert best is not None
    return Fit(best_tensors, best_step, best[0], history)


def held_out_per_class(shots: int, val_fraction: float) -> int:
    """Shots per class that `stratified_split` holds out for early stopping."""
    return min(max(round(val_fraction * shots), 1), shots - 1)


# Tip-Adapter's search grid: alpha spans a cache far weaker to far stronger than the zero-shot logits (a weak
# zero-shot head wants a large alpha), beta sharp to flat affinities.
TIP_ALPHAS = torch.logspace(-2, 4, 31)
TIP_BETAS = torch.logspace(-0.5, 2.5, 25)  # 0.3 .. 316: features of a weak model sit close together


def fit_tip(train_x: torch.Tensor, train_y: torch.Tensor, zero_shot: torch.Tensor, logit_scale: torch.Tensor | float,
            num_classes: int, *, config: AdaptConfig | None = None) -> Fit:
    """The Tip-Adapter cache of the shots (`train_x` features, `train_y` labels) with alpha and beta picked by
    leave-one-out top-1 on the shots (lower cross-entropy breaks ties); `zero_shot` is the (embed_dim, classes)
    head. With fewer than two shots of some class, `config.tip_alpha` / `tip_beta` are used."""
    cfg = config or AdaptConfig()
    f = F.normalize(train_x.float(), dim=-1).cpu()
    y = train_y.long().cpu()
    values = F.one_hot(y, num_classes).float()
    tensors = {"keys": f, "values": values, "alpha": torch.tensor([cfg.tip_alpha]),
               "beta": torch.tensor([cfg.tip_beta])}
    if int(torch.bincount(y, minlength=num_classes).min()) < 2:
        return Fit(tensors, 0)
    base = logit_scale * f @ zero_shot.float().cpu()
    distance = 1 - f @ f.T
    best, history = None, []
    for beta in TIP_BETAS.tolist():
        affinity = torch.exp(-beta * distance)
        affinity.fill_diagonal_(0)  # each shot is scored by the cache of the others
        cache = affinity @ values
        for alpha in TIP_ALPHAS.tolist():
            logits = base + alpha * cache
            acc, loss = float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))
            history.append((0, acc, loss))
            if best is None or (acc, -loss) > best[0]:
                best = ((acc, -loss), alpha, beta)
    assert best is not None
    tensors.update(alpha=torch.tensor([best[1]]), beta=torch.tensor([best[2]]))
    return Fit(tensors, 0, best[0][0], history)


def adapt(model: nn.Module, benchmark: str, root: str | os.PathLike, *, shots: int = 16, method: str = "prompt",
          config: AdaptConfig | None = None, tokenizer=None, seed: int = 0, batch_size: int = 256, workers: int = 0,
          device: str | torch.device | None = None, max_images: int | None = None, format: str | None = None,
          cache_dir: str | os.PathLike | None = None, language: str | None = None, classnames: Source = None,
          templates: Source = None) -> AdaptResult:
    """Adapt the zero-shot head of `benchmark` to `shots` training images per class and score it on its test split.

    `method` is "prompt" (learned context offsets), "ia3" (learned (IA)^3 scales) or "tip" (a Tip-Adapter cache
    of the shots' features, nothing trained); `config` holds the
    hyperparameters (AdaptConfig's defaults otherwise). Image features come from the probe's cache (`cache_dir`,
    default ~/.cache/vlpretrain/features; `max_images` caps each split, evenly spaced). The metrics are the
    zero-shot ones (top1, top5, mean_per_class_recall, headline, images) plus shots, num_train, steps and, with
    early stopping, val_top1. `language` picks the class names and templates the head starts from (default
    English); the adapter records it. `classnames` and `templates` replace the benchmark's own (see
    zeroshot.prompts; templates with {c}), and are needed again by `adapt_head`. The model's weights are left as
    they were.
    """
    cfg = config or AdaptConfig()
    bench = get_benchmark(benchmark, language)
    check_text_tower(model, method)
    prompts = prompt_set(model, tokenizer, *benchmark_prompts(bench, classnames, templates, shared=True))
    initial_tensors(model, method, prompts, n_ctx=cfg.n_ctx)  # a bad n_ctx fails before any image is read
    device = resolve_device(device, model)
    features = split_features(model, bench, root, ("train", "test"), batch_size=batch_size, workers=workers,
                              device=device, max_images=max_images, format=format, cache_dir=cache_dir)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    keep = few_shot_indices(train_y, shots, len(bench.classnames), seed)
    x, y = train_x[keep], train_y[keep]
    model.to(device)
    val_top1 = None
    if method == "tip":
        with frozen(model):
            zero_shot = adapted_head(model, method, {}, prompts, batch_size=256).detach()
        fit = fit_tip(x, y, zero_shot, _logit_scale(model), len(bench.classnames), config=cfg)
        val_top1 = fit.val_top1
    elif shots >= 2 and cfg.val_fraction > 0 and held_out_per_class(shots, cfg.val_fraction) >= cfg.min_val_per_class:
        tr, va = stratified_split(y, cfg.val_fraction, seed)
        fit = fit_adapter(model, method, prompts, x[tr], y[tr], config=cfg, val=(x[va], y[va]), seed=seed)
        val_top1 = fit.val_top1
        if cfg.refit:
            fit = fit_adapter(model, method, prompts, x, y, config=cfg, steps=fit.steps, seed=seed)
    else:
        fit = fit_adapter(model, method, prompts, x, y, config=cfg, seed=seed)
    adapter = Adapter(method, fit.tensors, bench.name, len(bench.classnames), weights_digest(model, scope="model"),
                      prompts.digest(), {**cfg.as_info(method), "shots": str(shots), "seed": str(seed),
                                         "trained_steps": str(fit.steps), "language": bench.language})
    with frozen(model):
        head = adapter.head(model, prompts).cpu()
    logits = adapter.logits(test_x, head, _logit_scale(model).cpu())
    metrics = classification_metrics(logits, test_y, headline=bench.metric)
    metrics.update(shots=float(shots), num_train=float(len(y)), steps=float(fit.steps))
    if val_top1 is not None:
        metrics["val_top1"] = val_top1
    return AdaptResult(adapter, metrics)


def adapt_head(model: nn.Module, adapter: Adapter, *, tokenizer=None, source: str | os.PathLike = "adapter",
               classnames: Source = None, templates: Source = None) -> torch.Tensor:
    """The adapted (embed_dim, classes) head of the adapter's benchmark (in the language it was fitted in), once
    `adapter.check` has accepted `model` and the prompts (the benchmark's own, or the `classnames` / `templates` the
    adapter was fitted with); for "tip", the zero-shot head its cache adds to: classify with `adapter.logits`."""
    bench = get_benchmark(adapter.benchmark, adapter.language)
    prompts = prompt_set(model, tokenizer, *benchmark_prompts(bench, classnames, templates, shared=True))
    adapter.check(model, bench.name, prompts, source=source)
    with frozen(model):
        return adapter.head(model, prompts)
