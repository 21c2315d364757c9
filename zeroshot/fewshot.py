"""Few-shot adaptation of zero-shot heads: learned prompts, (IA)^3 vectors, a Tip-Adapter cache or a linear head.

`adapt` takes k labelled training images per class of a benchmark (seeded, as the few-shot probe draws them), their
frozen image features (from the probe's feature cache), and fits an adapter (`zeroshot.adapters`) by cross-entropy of
the model's scaled cosine logits between those features and the adapted prompt-ensemble head. Training starts from
the zero-shot head (zero steps give it exactly); AdamW's decoupled weight decay pulls the learned change back towards
it. With two or more shots, a stratified part of the shots is held out to pick the number of steps (early stopping),
then the adapter is fitted again on all shots for that many steps, as the probe refits on train + validation.
Early stopping needs `min_val_per_class` held-out shots of every class: on fewer (one image per class at 4 shots)
the validation top-1 is too coarse to choose a step, and the fit runs `steps` steps.

"linear" trains the (embed_dim, classes) head itself on the frozen image features (`fit_linear`): it starts at the
zero-shot head and minimises the mean cross-entropy of `logit_scale * f W` plus `l2/2 * ||W - zero-shot head||^2`
(full-batch L-BFGS; the objective is convex), so its strength decides between prior and data. With two or more shots
the strength is chosen on a grid that ends in infinity (the zero-shot head itself) by cross-validation over the
shots (folds of whole shots, views included); with one shot per class there is nothing to hold out and CLAP's
class-wise strengths are used (Silva-Rodriguez et al. 2024: each class's mean zero-shot probability of its own shots,
so a class the zero-shot head already gets right stays near it).

`augment` (`--augment N`; default DEFAULT_AUGMENT: 10 for linear, 0 for the others) adds N random-resized-crop views
of each shot (`zeroshot.views`, features cached) to the training rows of prompt, ia3 and linear. Tip-Adapter, which
trains nothing, keeps the shots' own features as keys: keys averaged over 10 views (Tip-Adapter's own recipe) scored
lower on the digits benchmark of benchmarks/fewshot.py at every k (16 shots: 47.8% against 64.7%). A held-out
shot's views never train; early stopping scores held-out shots on their own features, the linear head's
cross-validation on those and their views.

"tip" (Tip-Adapter) trains nothing: its cache is the shots' features and labels, and its alpha and beta are picked
on a grid by leave-one-out accuracy over the shots (each shot scored by the cache of the others); with one shot
per class nothing can be held out and `tip_alpha` / `tip_beta` are used.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
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
from zeroshot.probe import DEFAULT_CACHE, split_features
from zeroshot.prompts import Source, benchmark_prompts
from zeroshot.views import Augment, view_features

# Adam step sizes that suit each parametrisation: prompt offsets live on the scale of token embeddings, (IA)^3
# scales around 1.
DEFAULT_LR = {"prompt": 2e-3, "ia3": 1e-2}
# Cropped views per shot by default (benchmarks/fewshot.py, digits): 10 views lift the linear head at every k
# (16 shots: 74.2% -> 88.4%); prompts and (IA)^3 gain at 1-2 shots but lose at 4-16 (16 shots: 52.0 -> 48.2 and
# 61.7 -> 54.0), so they train on the shots alone unless --augment says otherwise.
DEFAULT_AUGMENT = {"linear": 10}


@dataclass(frozen=True)
class AdaptConfig:
    """Hyperparameters of few-shot adaptation; the defaults are those docs/zeroshot.md states."""

    steps: int = 200  # most optimizer steps (early stopping may choose fewer); linear: L-BFGS iterations per fit
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
    augment: int | None = None  # cropped views per shot added to the training rows; None: DEFAULT_AUGMENT[method]
    augment_scale: float = 0.5  # smallest share of an image's area a view keeps
    augment_flip: bool = False  # also flip views left-right at random (not for digits or text)
    l2: float | None = None  # linear: penalty strength towards the zero-shot head; None: chosen (see fit_linear)
    folds: int = 4  # linear: most cross-validation folds over the shots when choosing l2

    def __post_init__(self) -> None:
        Augment(self.augment or 0, self.augment_scale, self.augment_flip)  # validates
        if self.l2 is not None and not self.l2 >= 0:
            raise ConfigError(f"l2: expected a number >= 0 (inf: the zero-shot head), got {self.l2!r}")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"folds: expected an integer >= 2, got {self.folds!r}")
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

    def views_for(self, method: str) -> int:
        """Views per shot that `method` trains on (Tip-Adapter: none, its keys are the shots' own features)."""
        if method == "tip":
            return 0
        return self.augment if self.augment is not None else DEFAULT_AUGMENT.get(method, 0)

    def augmentation(self, method: str) -> Augment:
        """The view settings of `method`."""
        return Augment(self.views_for(method), self.augment_scale, self.augment_flip)

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
        """The results-file task name: adapt_prompt, adapt_ia3, adapt_tip or adapt_linear."""
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


# Strengths of the linear head's pull towards the zero-shot head tried by cross-validation: 1e-5 .. 10 by decades,
# then infinity (the zero-shot head itself), so the choice includes "do not move"; the best finite one is then
# refined by half a decade either side.
LINEAR_L2S: tuple[float, ...] = tuple(10.0 ** e for e in range(-5, 2)) + (math.inf,)


def linear_objective(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, zero_shot: torch.Tensor,
                     logit_scale: float, l2: torch.Tensor | float) -> torch.Tensor:
    """Mean cross-entropy of `logit_scale * x @ weight` (x normalised rows) plus
    `1/2 * sum_c l2_c * ||weight[:, c] - zero_shot[:, c]||^2` (`l2` a number or one per class)."""
    ce = F.cross_entropy(logit_scale * x @ weight, y)
    l2 = torch.as_tensor(l2, dtype=weight.dtype, device=weight.device)
    return ce + 0.5 * (l2 * (weight - zero_shot).pow(2).sum(0)).sum()


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, zero_shot: torch.Tensor, logit_scale: float,
               l2: torch.Tensor | float, *, max_iter: int = 200, init: torch.Tensor | None = None) -> torch.Tensor:
    """The (embed_dim, classes) head minimising `linear_objective` on features `train_x` (normalised here), from
    `init` (default the zero-shot head) by full-batch L-BFGS in float64. Zero iterations or an infinite `l2` give
    the zero-shot head exactly."""
    w0 = zero_shot.detach().double().cpu()
    strength = torch.as_tensor(l2, dtype=torch.float64)
    if max_iter == 0 or bool(torch.isinf(strength).all()):
        return w0.float().clone()
    if bool(torch.isinf(strength).any()):
        raise ConfigError("l2: give all classes a finite strength, or all infinity")
    x = F.normalize(train_x.double().cpu(), dim=-1)
    y = train_y.long().cpu()
    w = (w0 if init is None else init.detach().double().cpu()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = linear_objective(w, x, y, w0, float(logit_scale), strength)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def clap_l2(x: torch.Tensor, y: torch.Tensor, zero_shot: torch.Tensor, logit_scale: float,
            num_classes: int) -> torch.Tensor:
    """CLAP's class-wise strengths [classes]: class c's mean zero-shot softmax probability of c over its shots,
    times 2 / classes (CLAP's penalty is the mean over classes of lambda_c ||w_c - t_c||^2)."""
    with torch.no_grad():
        p = torch.softmax(logit_scale * F.normalize(x.float(), dim=-1) @ zero_shot.float(), dim=1)
        own = p[torch.arange(len(y)), y.long()]
        per_class = torch.zeros(num_classes).index_add(0, y.long(), own) / torch.bincount(y.long(),
                                                                                           minlength=num_classes)
    return per_class * 2 / num_classes


def _with_views(x: torch.Tensor, y: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor] | None,
                keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows of the shots where `keep` (bool [shots]) holds: their features, then their views'."""
    if views is None:
        return x[keep], y[keep]
    vx, of = views
    rows = keep[of]
    return torch.cat([x[keep], vx[rows]]), torch.cat([y[keep], y[of[rows]]])


def shot_folds(y: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold of each shot [shots]: within each class the i-th shot goes to fold i mod `folds`."""
    out = torch.empty(len(y), dtype=torch.long)
    for c in y.unique():
        idx = torch.nonzero(y == c).flatten()
        out[idx] = torch.arange(len(idx)) % folds
    return out


def choose_linear_l2(x: torch.Tensor, y: torch.Tensor, zero_shot: torch.Tensor, logit_scale: float, *,
                     views: tuple[torch.Tensor, torch.Tensor] | None = None, folds: int = 4,
                     grid: Sequence[float] = LINEAR_L2S, refine: bool = True, score_views: bool = True,
                     max_iter: int = 200) -> tuple[float, float, list]:
    """(l2, cross-validated top-1, [(l2, top-1, loss)]) of the grid strength with the best top-1 over folds of
    whole shots (lower mean cross-entropy breaks ties); each fold trains on the other shots and their `views`
    (features [V, D], shot of each [V]) and is scored on its own shots and, with `score_views`, their views too
    (unseen in that fold's training; ten times the held-out rows make the choice less coarse at 2-4 shots)."""
    per_class = int(torch.bincount(y.long()).min())
    n_folds = min(folds, per_class)
    if n_folds < 2:
        raise ConfigError("choosing l2 by cross-validation needs at least 2 shots of every class")
    fold = shot_folds(y, n_folds)
    trials: list[tuple[float, float, float]] = []
    warm: dict[int, torch.Tensor] = {}

    def score(l2: float) -> None:
        correct, loss, count = 0.0, 0.0, 0
        for f in range(n_folds):
            tx, ty = _with_views(x, y, views, fold != f)
            w = fit_linear(tx, ty, zero_shot, logit_scale, l2, max_iter=max_iter, init=warm.get(f))
            if math.isfinite(l2):
                warm[f] = w
            vx, vy = _with_views(x, y, views, fold == f) if score_views else (x[fold == f], y[fold == f])
            logits = logit_scale * F.normalize(vx.float(), dim=-1) @ w
            correct += float((logits.argmax(1) == vy).sum())
            loss += float(F.cross_entropy(logits, vy, reduction="sum"))
            count += len(vy)
        trials.append((l2, correct / count, loss / count))

    def key(t: tuple[float, float, float]) -> tuple[float, float]:
        return t[1], -t[2]

    for l2 in sorted(grid, reverse=True):  # strongest first: each fit warm-starts from its neighbour
        score(l2)
    finite = [t for t in trials if math.isfinite(t[0])]
    if refine and finite:
        centre = max(finite, key=key)[0]
        for l2 in (centre * 10 ** 0.5, centre / 10 ** 0.5):
            score(l2)
    best = max(trials, key=key)
    return best[0], best[1], trials


def adapt(model: nn.Module, benchmark: str, root: str | os.PathLike, *, shots: int = 16, method: str = "prompt",
          config: AdaptConfig | None = None, tokenizer=None, seed: int = 0, batch_size: int = 256, workers: int = 0,
          device: str | torch.device | None = None, max_images: int | None = None, format: str | None = None,
          cache_dir: str | os.PathLike | None = None, language: str | None = None, classnames: Source = None,
          templates: Source = None) -> AdaptResult:
    """Adapt the zero-shot head of `benchmark` to `shots` training images per class and score it on its test split.

    `method` is "prompt" (learned context offsets), "ia3" (learned (IA)^3 scales), "tip" (a Tip-Adapter cache
    of the shots' features, nothing trained) or "linear" (the head itself, from the zero-shot head, see
    `fit_linear`); `config` holds the hyperparameters (AdaptConfig's defaults otherwise), `config.views_for(method)`
    the cropped views per shot added to the training rows. Image features come from the probe's cache (`cache_dir`,
    default ~/.cache/vlpretrain/features; `max_images` caps each split, evenly spaced). The metrics are the
    zero-shot ones (top1, top5, mean_per_class_recall, headline, images) plus shots, num_train, steps, augment
    and, with early stopping or cross-validation, val_top1 (linear: l2 when finite and chosen or given).
    `language` picks the class names and templates the head starts from (default English); the adapter records it.
    `classnames` and `templates` replace the benchmark's own (see zeroshot.prompts; templates with {c}), and are
    needed again by `adapt_head`. The model's weights are left as they were.
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
    views = None
    n_views = cfg.views_for(method)
    if n_views:
        vx, _ = view_features(model, bench, root, keep, cfg.augmentation(method), cache_dir or DEFAULT_CACHE, seed=seed,
                              batch_size=batch_size, workers=workers, device=device, max_images=max_images,
                              format=format)
        views = (vx, torch.arange(len(keep)).repeat_interleave(n_views))
    everything = torch.ones(len(y), dtype=torch.bool)
    val_top1, info = None, {}
    if method in ("tip", "linear"):
        with frozen(model):
            zero_shot = adapted_head(model, "tip", {}, prompts, batch_size=256).detach().cpu()
        scale = float(_logit_scale(model))
    if method == "tip":  # keys are the shots' own features: keys averaged over views scored lower (see module doc)
        fit = fit_tip(x, y, zero_shot, scale, len(bench.classnames), config=cfg)
        val_top1 = fit.val_top1
    elif method == "linear":
        if cfg.l2 is not None:
            l2: float | torch.Tensor = cfg.l2
            info["l2"] = str(cfg.l2)
        elif int(torch.bincount(y, minlength=len(bench.classnames)).min()) >= 2:
            l2, val_top1, _ = choose_linear_l2(x, y, zero_shot, scale, views=views, folds=cfg.folds,
                                               max_iter=cfg.steps)
            info["l2"] = str(l2)
        else:
            l2 = clap_l2(x, y, zero_shot, scale, len(bench.classnames))
            info["l2"] = "clap"
        tx, ty = _with_views(x, y, views, everything)
        fit = Fit({"weight": fit_linear(tx, ty, zero_shot, scale, l2, max_iter=cfg.steps)}, cfg.steps)
    elif shots >= 2 and cfg.val_fraction > 0 and held_out_per_class(shots, cfg.val_fraction) >= cfg.min_val_per_class:
        tr, va = stratified_split(y, cfg.val_fraction, seed)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[tr] = True
        fit = fit_adapter(model, method, prompts, *_with_views(x, y, views, mask), config=cfg, val=(x[va], y[va]),
                          seed=seed)
        val_top1 = fit.val_top1
        if cfg.refit:
            fit = fit_adapter(model, method, prompts, *_with_views(x, y, views, everything), config=cfg,
                              steps=fit.steps, seed=seed)
    else:
        fit = fit_adapter(model, method, prompts, *_with_views(x, y, views, everything), config=cfg, seed=seed)
    adapter = Adapter(method, fit.tensors, bench.name, len(bench.classnames), weights_digest(model, scope="model"),
                      prompts.digest(), {**cfg.as_info(method), **info, "augment": str(n_views), "shots": str(shots),
                                         "seed": str(seed), "trained_steps": str(fit.steps),
                                         "language": bench.language})
    with frozen(model):
        head = adapter.head(model, prompts).cpu()
    logits = adapter.logits(test_x, head, _logit_scale(model).cpu())
    metrics = classification_metrics(logits, test_y, headline=bench.metric)
    metrics.update(shots=float(shots), num_train=float(len(y)), steps=float(fit.steps), augment=float(n_views))
    if method == "linear" and info["l2"] != "clap" and math.isfinite(float(info["l2"])):
        metrics["l2"] = float(info["l2"])
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
