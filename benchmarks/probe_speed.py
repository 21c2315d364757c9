"""Time our torch L-BFGS probe against scikit-learn's LogisticRegression on the same synthetic features.

Features mimic frozen image embeddings: a large component shared by every sample, class means, and anisotropic
noise (a decaying spectrum in a random basis), L2-normalised. Both libraries get the same float32 array.
scikit-learn runs at a tight tolerance (the largest gradient entry under 1e-4 of its value at zero weights) and at
its default tol=1e-4, which on unit-norm features with many classes is a sizeable fraction of the gradient at zero
and stops early; the objectives and test accuracies show how close each fit got.

    PYTHONPATH=. python benchmarks/probe_speed.py                 # 50k x 512, 100 classes, one fixed C
    PYTHONPATH=. python benchmarks/probe_speed.py --sweep         # plus the CLIP l2 sweep, both libraries
    PYTHONPATH=. python benchmarks/probe_speed.py --sweep --sweep-tight   # plus scikit-learn's sweep run tight
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from zeroshot.logistic import (
    accuracy_and_loss,
    cross_entropy_sum,
    fit_logistic_regression,
    gradient_scale_at_zero,
    normalize_features,
    stratified_split,
    sweep_l2,
)


def make_features(n: int, dim: int, classes: int, seed: int, class_sep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding-like features: shared offset + class mean + anisotropic noise, unit-normalised rows."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    spectrum = (torch.arange(dim) + 1.0) ** -0.5
    spectrum = spectrum / spectrum.pow(2).mean().sqrt()
    shared = torch.randn(dim, generator=g) * 1.5
    means = torch.randn(classes, dim, generator=g) * class_sep
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    noise = (torch.randn(n, dim, generator=g) * spectrum) @ basis.T
    return normalize_features(shared + means[y] + noise), y


def sklearn_fit(x: np.ndarray, y: np.ndarray, l2: float, tol: float, max_iter: int, warm=None):
    """scikit-learn's multinomial lbfgs at C = 1/l2; `warm` is a previous estimator to start from."""
    from sklearn.linear_model import LogisticRegression

    clf = warm if warm is not None else LogisticRegression(tol=tol, max_iter=max_iter, warm_start=True)
    clf.set_params(C=1.0 / l2)
    return clf.fit(x, y)


def sklearn_objective(x: torch.Tensor, y: torch.Tensor, clf, l2: float) -> float:
    w, b = torch.tensor(clf.coef_, dtype=torch.float64), torch.tensor(clf.intercept_, dtype=torch.float64)
    return float(cross_entropy_sum(x.double(), y, w, b)) + 0.5 * l2 * float(w.pow(2).sum())


def fixed_c(train_x, train_y, test_x, test_y, classes: int, l2: float, tol: float, rtol: float, max_iter: int,
            sk_dtype: type) -> None:
    """One fit at a fixed strength: ours, scikit-learn on the same stopping rule, scikit-learn at its default tol."""
    threshold = tol * gradient_scale_at_zero(train_x, train_y, classes)
    print(f"\n== fixed l2 = {l2:g} (C = {1 / l2:g}) ==")
    print(f"ours stops when its gradient falls under {tol:g} x its value at zero weights or once 50 iterations "
          f"gain < {rtol:g} of the objective;\nscikit-learn runs once with tol={threshold:.3g} ({tol:g} x its "
          f"gradient at zero: tight) and once with its default tol=1e-4")
    t0 = time.perf_counter()
    ours = fit_logistic_regression(train_x, train_y, classes, l2, tol=tol, rtol=rtol, max_iter=max_iter,
                                   device="cpu")
    t_ours = time.perf_counter() - t0
    acc_ours, _ = accuracy_and_loss(ours, test_x, test_y)
    print(f"ours (torch L-BFGS, float32):            {t_ours:7.1f} s  {ours.n_iter:4d} iters  objective "
          f"{ours.objective:.7g}  test top1 {100 * acc_ours:.2f}%")

    x_np, y_np = train_x.numpy().astype(sk_dtype), train_y.numpy()
    name = np.dtype(sk_dtype).name
    for label, sk_tol in [("tight tol", threshold), ("default tol", 1e-4)]:
        t0 = time.perf_counter()
        sk = sklearn_fit(x_np, y_np, l2, sk_tol, max_iter)
        t_sk = time.perf_counter() - t0
        acc_sk = float(sk.score(test_x.numpy().astype(sk_dtype), test_y.numpy()))
        obj_sk = sklearn_objective(train_x, train_y, sk, l2)
        print(f"scikit-learn lbfgs, {name}, {label + ':':12s} {t_sk:7.1f} s  {int(sk.n_iter_[0]):4d} iters  "
              f"objective {obj_sk:.7g}  test top1 {100 * acc_sk:.2f}%")
        print(f"    -> ours is {t_sk / t_ours:.1f}x faster; objective gap (ours - sklearn) / sklearn "
              f"{(ours.objective - obj_sk) / obj_sk:+.1e}; accuracy gap {100 * (acc_ours - acc_sk):+.2f} points")


def sklearn_sweep(train_x, train_y, trials: list[float], tr, va, tol: float, max_iter: int, warm: bool,
                  sk_dtype: type):
    """scikit-learn over the given l2 values (our sweep's, in its order): (final estimator, chosen l2, its val
    accuracy, seconds), the final refit on train + val included."""
    x_tr, y_tr = train_x[tr].numpy().astype(sk_dtype), train_y[tr].numpy()
    x_va, y_va = train_x[va].numpy().astype(sk_dtype), train_y[va].numpy()
    t0 = time.perf_counter()
    sk, best = None, (-1.0, 0.0)
    for l2 in trials:
        sk = sklearn_fit(x_tr, y_tr, l2, tol, max_iter, warm=sk if warm else None)
        best = max(best, (float(sk.score(x_va, y_va)), l2), key=lambda t: t[0])
    final = sklearn_fit(train_x.numpy().astype(sk_dtype), train_y.numpy(), best[1], tol, max_iter)
    return final, best[1], best[0], time.perf_counter() - t0


def full_sweep(train_x, train_y, test_x, test_y, classes: int, tol: float, rtol: float, max_iter: int,
               coarse: int, refine: int, sk_dtype: type, tight: bool) -> None:
    """The CLIP protocol (coarse grid + halving refinement) with our fits, then scikit-learn over the same l2 values:
    as the CLIP paper ran it (default tol=1e-4, max_iter=1000, each fit from scratch) and, with `tight`, warm-started
    at our gradient threshold."""
    tr, va = stratified_split(train_y, 0.2, seed=0)
    print(f"\n== l2 sweep: {coarse} coarse points over [1e-6, 1e6] + {refine} halving rounds ==")
    t0 = time.perf_counter()
    sweep = sweep_l2(train_x[tr], train_y[tr], train_x[va], train_y[va], classes, coarse_steps=coarse,
                     refine_steps=refine, tol=tol, rtol=rtol, max_iter=max_iter, device="cpu")
    final = fit_logistic_regression(train_x, train_y, classes, sweep.l2, init=sweep.classifier, tol=tol,
                                    rtol=rtol, max_iter=max_iter, device="cpu")
    t_ours = time.perf_counter() - t0
    acc_ours, _ = accuracy_and_loss(final, test_x, test_y)
    trials = [t[0] for t in sweep.trials]
    print(f"ours (warm starts):                {t_ours:7.1f} s for {len(trials)} fits + final; l2 {sweep.l2:.3g} "
          f"(val {100 * sweep.val_top1:.2f}%)  test top1 {100 * acc_ours:.2f}%")
    runs = [("scikit-learn, tol=1e-4, cold:", 1e-4, False)]
    if tight:
        threshold = tol * gradient_scale_at_zero(train_x[tr], train_y[tr], classes)
        runs.append((f"scikit-learn, tol={threshold:.2g}, warm:", threshold, True))
    for label, sk_tol, warm in runs:
        sk, l2, val, t_sk = sklearn_sweep(train_x, train_y, trials, tr, va, sk_tol, max_iter, warm, sk_dtype)
        acc_sk = float(sk.score(test_x.numpy().astype(sk_dtype), test_y.numpy()))
        print(f"{label:34s}{t_sk:7.1f} s for the same l2 values + final; l2 {l2:.3g} (val {100 * val:.2f}%)  "
              f"test top1 {100 * acc_sk:.2f}%")
        print(f"    -> ours is {t_sk / t_ours:.1f}x faster; accuracy gap {100 * (acc_ours - acc_sk):+.2f} points")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--class-sep", type=float, default=0.1, help="std of the class means (harder when smaller)")
    p.add_argument("--l2", type=float, default=0.01, help="fixed strength (C = 1/l2) for the single-fit timing")
    p.add_argument("--tol", type=float, default=1e-4, help="gradient tolerance, relative to the gradient at zero")
    p.add_argument("--rtol", type=float, default=1e-4, help="stop once 50 iterations gain less than this (relative)")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sklearn-float64", action="store_true",
                   help="give scikit-learn float64 features (default: the same float32 array ours gets)")
    p.add_argument("--sweep", action="store_true", help="also time the full l2 sweep")
    p.add_argument("--sweep-tight", action="store_true",
                   help="with --sweep, also run scikit-learn's sweep at our gradient threshold (slow)")
    p.add_argument("--coarse", type=int, default=7)
    p.add_argument("--refine", type=int, default=4)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    blas = [f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()]
    print(f"{os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}; numpy/scipy BLAS and OpenMP threads "
          f"{', '.join(blas)} (scikit-learn's own loss loop is single-threaded for lbfgs)")
    x, y = make_features(args.n_train + args.n_test, args.dim, args.classes, seed=0, class_sep=args.class_sep)
    train_x, train_y = x[:args.n_train], y[:args.n_train]
    test_x, test_y = x[args.n_train:], y[args.n_train:]
    print(f"features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, {args.classes} classes")
    sk_dtype = np.float64 if args.sklearn_float64 else np.float32
    fixed_c(train_x, train_y, test_x, test_y, args.classes, args.l2, args.tol, args.rtol, args.max_iter, sk_dtype)
    if args.sweep:
        full_sweep(train_x, train_y, test_x, test_y, args.classes, args.tol, args.rtol, args.max_iter, args.coarse,
                   args.refine, sk_dtype, args.sweep_tight)


if __name__ == "__main__":
    main()
