"""The linear probe's fit: multinomial logistic regression by L-BFGS in torch, and the CLIP paper's protocol on
features (`linear_probe_features`). `zeroshot.probe` runs it on a benchmark.

The probe is multinomial logistic regression on L2-normalised features. `l2` is the inverse of scikit-learn's `C`:
we minimise  sum_i CE_i + l2/2 * ||W||^2  (no penalty on the bias), which is scikit-learn's objective divided by C,
so a probe here and `LogisticRegression(C=1/l2)` have the same optimum. The fit is full-batch L-BFGS with a
strong-Wolfe line search, in float32 on the CPU or a GPU, over row chunks so memory stays bounded at ImageNet scale,
on variables preconditioned by the feature covariance (the same objective, reached in ~10x fewer iterations).

The protocol (CLIP, Radford et al. 2021, appendix A.3): sweep the L2 strength over [1e-6, 1e6] in log space on a
validation split held out from train, keep the strength with the best validation accuracy, then fit once more on
train + validation at that strength. Like the paper's parametric binary search, the default sweep starts from
[1e-6, 1e-4, ..., 1e6] and halves the step around the best point four times, down to 8 steps per decade (the
paper's 96 steps over the range) in at most 15 fits; every fit warm-starts from the nearest solution found.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlpretrain.errors import ConfigError, DataError
from vlpretrain.progress import progress as progress_bar
from vlpretrain.stopping import StopCheck, check_stop
from zeroshot.features import resolve_device
from zeroshot.metrics import topk_metrics

# Row chunks keep the logits of one chunk under ~2^25 elements (128 MiB in float32) whatever the data size.
_MAX_CHUNK_ELEMENTS = 1 << 25
# L-BFGS iterations between two checks of the objective's relative progress.
_CHECK_EVERY = 50


@dataclass(frozen=True)
class LinearClassifier:
    """A fitted probe: logits = x @ weight.T + bias, with the fit's regularisation and how it went."""

    weight: torch.Tensor  # [num_classes, dim]
    bias: torch.Tensor  # [num_classes]
    l2: float
    loss: float  # mean cross-entropy on the training features at the solution
    objective: float  # sum of cross-entropies + l2/2 * ||weight||^2 (scikit-learn's objective / C)
    n_iter: int  # L-BFGS iterations
    converged: bool  # stopped on a tolerance (gradient, or too little progress), not on max_iter

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of features `x` (on the classifier's device and dtype)."""
        return torch.addmm(self.bias, x.to(self.weight), self.weight.t())


@dataclass(frozen=True)
class SweepResult:
    """The chosen L2 strength and every (l2, validation accuracy, validation loss) tried, in the order tried."""

    l2: float
    val_top1: float
    trials: list[tuple[float, float, float]] = field(default_factory=list)
    classifier: LinearClassifier | None = None  # the fit on the training part at the chosen l2


def normalize_features(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (the probe's input, as in the CLIP protocol)."""
    return F.normalize(x.float(), dim=-1)


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{what}: expected features [N, D] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{what}: no samples")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{what}: label {lo if lo < 0 else hi} outside [0, {num_classes}) classes")


def _chunk_rows(num_classes: int) -> int:
    return max(1024, _MAX_CHUNK_ELEMENTS // max(num_classes, 1))


def cross_entropy_sum(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the multinomial cross-entropy of the linear classifier (weight, bias), chunked."""
    chunk = _chunk_rows(len(weight))
    total = weight.new_zeros((), dtype=torch.float64)
    for s in range(0, len(x), chunk):
        logits = torch.addmm(bias, x[s:s + chunk], weight.t())
        total += F.cross_entropy(logits, y[s:s + chunk], reduction="sum").double()
    return total


@contextlib.contextmanager
def _flush_subnormals(device: torch.device) -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU while fitting, then restore torch's default (off).

    Softmax probabilities of hopeless classes underflow to subnormals once weakly regularised logits spread by
    more than ~87; CPU matrix products on them run 5-15x slower, for changes float32 cannot represent anyway.
    torch has no getter for this flag, so we restore the default rather than a saved value.
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _gradient_at_zero(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the mean cross-entropy at W = 0, b = 0 (every class at probability 1/C), in closed form."""
    n = len(x)
    class_sums = torch.zeros(num_classes, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, y, x)
    grad_w = (x.sum(0, keepdim=True) / num_classes - class_sums) / n
    grad_b = 1.0 / num_classes - torch.bincount(y, minlength=num_classes).to(x.dtype) / n
    return grad_w, grad_b


def gradient_scale_at_zero(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Largest entry of the mean-CE gradient with respect to (W, b) at zero weights."""
    grad_w, grad_b = _gradient_at_zero(x, y, num_classes)
    return max(float(grad_w.abs().max()), float(grad_b.abs().max()))


@dataclass(frozen=True)
class FeatureSpectrum:
    """Mean and covariance eigendecomposition of a set of training features (what preconditioning needs)."""

    mean: torch.Tensor  # [D]
    eigvals: torch.Tensor  # [D], ascending, float64
    basis: torch.Tensor  # [D, D], orthonormal eigenvector columns

    @classmethod
    def of(cls, x: torch.Tensor) -> FeatureSpectrum:
        mean = x.mean(0)
        cov = (x.t() @ x).double() / len(x) - torch.outer(mean.double(), mean.double())
        eigvals, basis = torch.linalg.eigh(cov)
        return cls(mean, eigvals.clamp_min(0), basis.to(x.dtype))

    def like(self, x: torch.Tensor) -> FeatureSpectrum:
        """The same spectrum on the device (and in the dtype) of features `x`."""
        return FeatureSpectrum(self.mean.to(x), self.eigvals.to(x.device), self.basis.to(x))


@dataclass(frozen=True)
class _Preconditioner:
    """A change of variables W = (V * scale) @ basis.T, b = c - W @ mean that leaves the objective unchanged.

    Unit-norm image features are far from isotropic (a large shared component, a decaying spectrum), which makes
    plain L-BFGS crawl. In the feature covariance's eigenbasis, scaling each direction by 1/sqrt(eigenvalue +
    delta) makes the Hessian in V close to a multiple of the identity: the data term's curvature is about
    eigenvalue / C, the penalty's is lam, and delta = lam * C balances the two. Because the penalty is computed
    on W itself, this only changes the speed of the fit, never its optimum.
    """

    mean: torch.Tensor  # [D]
    basis: torch.Tensor  # [D, D], orthonormal columns
    scale: torch.Tensor  # [D]

    @classmethod
    def fit(cls, spectrum: FeatureSpectrum, lam: float, num_classes: int) -> _Preconditioner:
        # The floor keeps the scale finite in float32 when lam is tiny and the features are rank-deficient.
        delta = max(lam * num_classes, 1e-6 * float(spectrum.eigvals.max()), 1e-30)
        scale = (spectrum.eigvals + delta).rsqrt().to(spectrum.basis.dtype)
        return cls(spectrum.mean, spectrum.basis, scale)

    def to_original(self, v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = (v * self.scale) @ self.basis.t()
        return w, c - w @ self.mean

    def from_original(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (w @ self.basis) / self.scale, b + w @ self.mean


def fit_logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, l2: float, *,
                            max_iter: int = 1000, tol: float = 1e-4, rtol: float = 1e-4, history_size: int = 10,
                            device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                            init: LinearClassifier | None = None,
                            spectrum: FeatureSpectrum | None = None) -> LinearClassifier:
    """Multinomial logistic regression minimising sum CE + l2/2 ||W||^2 by full-batch L-BFGS (strong Wolfe).

    Same optimum as scikit-learn's `LogisticRegression(C=1/l2)`; L-BFGS runs on preconditioned variables (see
    _Preconditioner). It stops when the largest gradient entry falls under `tol` times its value at zero weights
    (relative, as an absolute bound means little across feature scales and class counts), or once 50 iterations
    together gain less than `rtol` of the objective. Features are used as given (normalise them first for the
    CLIP protocol). `init` warm-starts from another fit, which makes a sweep of l2 cheaper; `spectrum`
    (`FeatureSpectrum.of(train_x)`) saves recomputing the covariance when fitting the same features again.
    """
    if not l2 > 0 or not math.isfinite(l2):
        raise ConfigError(f"l2: the regularisation strength must be a positive number, got {l2}")
    _check_xy(train_x, train_y, num_classes, "probe train set")
    device = resolve_device(device)
    x = train_x.to(device=device, dtype=dtype)
    y = train_y.to(device=device, dtype=torch.long)
    n, dim = x.shape
    # The optimiser sees the objective divided by n (mean CE + lam/2 ||W||^2): well scaled whatever n is.
    lam = l2 / n
    spectrum = FeatureSpectrum.of(x) if spectrum is None else spectrum.like(x)
    assert spectrum.basis.shape == (dim, dim), "spectrum of features of another width"
    pre = _Preconditioner.fit(spectrum, lam, num_classes)
    if init is not None:
        assert init.weight.shape == (num_classes, dim), "warm start from a classifier of another shape"
        v, c = pre.from_original(init.weight.to(device=device, dtype=dtype), init.bias.to(device=device, dtype=dtype))
    else:
        v = torch.zeros(num_classes, dim, device=device, dtype=dtype)
        c = torch.zeros(num_classes, device=device, dtype=dtype)
    v, c = v.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    chunk = _chunk_rows(num_classes)
    evals, best = 0, math.inf

    def closure() -> torch.Tensor:
        nonlocal evals, best
        v.grad, c.grad = None, None
        w_graph, b_graph = pre.to_original(v, c)
        # Gradients with respect to (W, b) are accumulated chunk by chunk on detached copies, then sent back
        # through the small change of variables once.
        w, b = w_graph.detach().requires_grad_(True), b_graph.detach().requires_grad_(True)
        # Sums in float64: a warm start's first steps gain ~1e-10, below what a float32 total can resolve, and
        # L-BFGS would take that for convergence.
        total = torch.zeros((), device=device, dtype=torch.float64)
        for s in range(0, n, chunk):
            logits = torch.addmm(b, x[s:s + chunk], w.t())
            part = F.cross_entropy(logits, y[s:s + chunk], reduction="none").double().sum() / n
            part.backward()  # per chunk, so only one chunk's logits are alive at a time
            total += part.detach()
        reg = 0.5 * lam * w.double().pow(2).sum()
        reg.backward()
        torch.autograd.backward([w_graph, b_graph], [w.grad, b.grad])
        value = total + reg.detach()
        evals += 1
        best = min(best, float(value))
        return value

    grad_w0, grad_b0 = _gradient_at_zero(x, y, num_classes)
    # Chain rule through the change of variables: b = c - W @ mean, then dL/dV = (dL/dW @ basis) * scale.
    grad_v0 = ((grad_w0 - torch.outer(grad_b0, pre.mean)) @ pre.basis) * pre.scale
    g0 = max(float(grad_v0.abs().max()), float(grad_b0.abs().max()))
    opt = torch.optim.LBFGS([v, c], lr=1.0, max_iter=_CHECK_EVERY, max_eval=2 * _CHECK_EVERY + 25,
                            tolerance_grad=tol * g0 if g0 > 0 else tol, tolerance_change=1e-12,
                            history_size=history_size, line_search_fn="strong_wolfe")
    # L-BFGS runs in rounds of _CHECK_EVERY iterations (its state carries over), so that we can stop once a
    # round gains less than rtol of the objective: the last digits of a probe's objective never move accuracy.
    n_iter, converged = 0, False
    with _flush_subnormals(device):
        while n_iter < max_iter and not converged:
            group = opt.param_groups[0]
            group["max_iter"] = min(_CHECK_EVERY, max_iter - n_iter)
            best_before, evals_before = best, evals
            opt.step(closure)
            ran = opt.state[v]["n_iter"] - n_iter
            n_iter += ran
            stopped_on_tolerance = ran < group["max_iter"] and evals - evals_before < group["max_eval"]
            converged = stopped_on_tolerance or best_before - best <= rtol * abs(best)
    with torch.no_grad():
        w, b = pre.to_original(v, c)
    ce_sum = float(cross_entropy_sum(x, y, w, b))
    objective = ce_sum + 0.5 * l2 * float(w.double().pow(2).sum())
    return LinearClassifier(weight=w, bias=b, l2=float(l2), loss=ce_sum / n, objective=objective,
                            n_iter=n_iter, converged=converged)


def accuracy_and_loss(clf: LinearClassifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of `clf` on features `x` with labels `y`."""
    x = x.to(clf.weight)
    y = y.to(clf.weight.device)
    chunk = _chunk_rows(len(clf.weight))
    correct = 0
    for s in range(0, len(x), chunk):
        correct += int((clf.logits(x[s:s + chunk]).argmax(1) == y[s:s + chunk]).sum())
    loss = float(cross_entropy_sum(x, y, clf.weight, clf.bias)) / len(x)
    return correct / len(x), loss


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) holding out about `val_fraction` of each class (seeded); classes with one sample stay
    in train, and every class keeps at least one training sample."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = min(max(round(val_fraction * len(idx)), 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train, val = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    if len(val) == 0:
        raise ConfigError("l2: no class has two training samples to hold out for the sweep; give a fixed l2")
    return train, val


def few_shot_indices(labels: torch.Tensor, shots: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of `shots` samples of every class, drawn without replacement (seeded), sorted."""
    if shots < 1:
        raise ConfigError(f"shots: must be at least 1, got {shots}")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < shots:
            raise DataError(f"class {c} has {len(idx)} training samples, fewer than shots={shots}")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return torch.cat(picked).sort().values


def sweep_l2(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
             num_classes: int, *, l2_range: tuple[float, float] = (1e-6, 1e6), coarse_steps: int = 7,
             refine_steps: int = 4, progress: bool = False, should_stop: StopCheck | None = None,
             **fit_kwargs) -> SweepResult:
    """The L2 strength with the best validation accuracy (lower validation loss breaks ties).

    A coarse log grid over `l2_range`, fitted from the strongest regularisation down so each fit warm-starts from
    its neighbour, then `refine_steps` rounds that try half the previous step either side of the best so far.
    `should_stop` is asked before each fit (see `vlpretrain.stopping`).
    """
    lo, hi = sorted(math.log10(v) for v in l2_range)
    if coarse_steps < 2:
        raise ConfigError(f"coarse_steps: the sweep needs at least 2 grid points, got {coarse_steps}")
    step = (hi - lo) / (coarse_steps - 1)
    spectrum = FeatureSpectrum.of(train_x.to(device=resolve_device(fit_kwargs.get("device")),
                                             dtype=fit_kwargs.get("dtype", torch.float32)))
    fits: dict[float, LinearClassifier] = {}
    scores: dict[float, tuple[float, float]] = {}
    order: list[float] = []

    def key(e: float) -> tuple[float, float]:
        return scores[e][0], -scores[e][1]

    def try_exponent(e: float) -> None:
        e = round(e, 9)  # exponents reached by different paths compare equal
        if e in fits or not lo - 1e-9 <= e <= hi + 1e-9:
            return
        check_stop(should_stop)
        init = fits[min(fits, key=lambda f: abs(f - e))] if fits else None
        fits[e] = fit_logistic_regression(train_x, train_y, num_classes, 10.0 ** e, init=init, spectrum=spectrum,
                                          **fit_kwargs)
        bar.update(1)
        scores[e] = accuracy_and_loss(fits[e], val_x, val_y)
        order.append(e)

    with progress_bar(coarse_steps + 2 * refine_steps, "probe l2 sweep", "fit", enabled=progress) as bar:
        for i in reversed(range(coarse_steps)):
            try_exponent(lo + i * step)
        for _ in range(refine_steps):
            step /= 2
            best = max(fits, key=key)
            try_exponent(best - step)
            try_exponent(best + step)
    best = max(fits, key=key)
    trials = [(10.0 ** e, *scores[e]) for e in order]
    return SweepResult(l2=10.0 ** best, val_top1=scores[best][0], trials=trials, classifier=fits[best])


def evaluate_classifier(clf: LinearClassifier, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Metrics of `clf` on features `x`; logits are made a chunk at a time and only each row's top 5 is kept."""
    chunk = _chunk_rows(num_classes)
    k = min(5, num_classes)
    top = torch.cat([clf.logits(x[s:s + chunk]).topk(k, dim=1).indices for s in range(0, len(x), chunk)])
    return topk_metrics(top, y, num_classes)


def linear_probe_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, *, num_classes: int, l2: float | None = None,
                          shots: int | None = None, seed: int = 0, val_fraction: float = 0.2,
                          l2_range: tuple[float, float] = (1e-6, 1e6), coarse_steps: int = 7,
                          refine_steps: int = 4, max_iter: int = 1000, tol: float = 1e-4, rtol: float = 1e-4,
                          device: str | torch.device | None = None, progress: bool = False,
                          should_stop: StopCheck | None = None) -> dict[str, float]:
    """The CLIP linear-probe protocol on precomputed features; returns test metrics plus the l2 used.

    Features are L2-normalised. `shots` keeps that many training samples per class (seeded). Without `l2` the
    strength is swept on a stratified `val_fraction` of train and the final probe is fitted on all of train at
    the chosen strength; with `l2` the sweep is skipped. Keys: top1, top5 (over 5 classes),
    mean_per_class_recall, num_images (test), num_train, l2, and val_top1 when swept. `should_stop` is asked before
    each fit (see `vlpretrain.stopping`).
    """
    _check_xy(train_x, train_y, num_classes, "probe train set")
    _check_xy(test_x, test_y, num_classes, "probe test set")
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    if shots is not None:
        keep = few_shot_indices(train_y, shots, num_classes, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    device = resolve_device(device)
    train_x = normalize_features(train_x).to(device)
    train_y = train_y.to(device)
    fit_kwargs = {"max_iter": max_iter, "tol": tol, "rtol": rtol, "device": device}
    out: dict[str, float] = {}
    init = None
    if l2 is None:
        tr, va = stratified_split(train_y.cpu(), val_fraction, seed)
        tr, va = tr.to(device), va.to(device)
        sweep = sweep_l2(train_x[tr], train_y[tr], train_x[va], train_y[va], num_classes, l2_range=l2_range,
                         coarse_steps=coarse_steps, refine_steps=refine_steps, progress=progress,
                         should_stop=should_stop, **fit_kwargs)
        l2, init = sweep.l2, sweep.classifier
        out["val_top1"] = sweep.val_top1
    check_stop(should_stop)
    clf = fit_logistic_regression(train_x, train_y, num_classes, l2, init=init, **fit_kwargs)
    out = {**evaluate_classifier(clf, normalize_features(test_x), test_y, num_classes),
           "num_images": float(len(test_y)), "num_train": float(len(train_y)), "l2": float(l2), **out}
    return out
