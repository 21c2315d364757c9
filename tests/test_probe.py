"""Linear probes: the torch L-BFGS fit against scikit-learn, the l2 sweep, few-shot sampling, metrics, and the
feature cache."""

import functools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vlpretrain.errors import ConfigError, DataError
from zeroshot import logistic as probe
from zeroshot.features import cache_path, cached_features, encode_images, weights_digest
from zeroshot.logistic import (
    accuracy_and_loss,
    few_shot_indices,
    fit_logistic_regression,
    linear_probe_features,
    normalize_features,
    stratified_split,
    sweep_l2,
)
from zeroshot.metrics import topk_metrics

NUM_CLASSES = 10


def blobs(n: int, dim: int = 64, classes: int = NUM_CLASSES, seed: int = 0, sep: float = 0.35):
    """Gaussian blobs around random class means: hard enough that regularisation matters."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    return means[y] + torch.randn(n, dim, generator=g), y


@pytest.fixture(scope="module")
def data():
    x, y = blobs(3000)
    x = normalize_features(x)
    return x[:2000], y[:2000], x[2000:], y[2000:]


def sklearn_objective(x, y, coef, intercept, l2):
    """sum CE + l2/2 ||W||^2 computed in float64 numpy, by hand."""
    logits = x.double().numpy() @ coef.T + intercept
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y.numpy()].sum() + 0.5 * l2 * (coef ** 2).sum())


# ---- the fit -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("l2", [0.1, 3.0, 100.0])
def test_fit_matches_sklearn_at_same_regularisation(data, l2):
    train_x, train_y, test_x, test_y = data
    ours = fit_logistic_regression(train_x, train_y, NUM_CLASSES, l2, tol=1e-6, rtol=1e-9, device="cpu")
    sk = LogisticRegression(C=1.0 / l2, tol=1e-9, max_iter=5000).fit(train_x.double().numpy(), train_y.numpy())

    obj_sk = sklearn_objective(train_x, train_y, sk.coef_, sk.intercept_, l2)
    obj_ours = sklearn_objective(train_x, train_y, ours.weight.double().numpy(), ours.bias.double().numpy(), l2)
    assert ours.converged
    assert ours.objective == pytest.approx(obj_ours, rel=1e-6)  # the reported objective is the real one
    assert obj_ours == pytest.approx(obj_sk, rel=2e-5)
    assert ours.loss == pytest.approx(obj_sk / len(train_y) - 0.5 * l2 * (sk.coef_ ** 2).sum() / len(train_y),
                                      abs=2e-4)
    for x, y in [(train_x, train_y), (test_x, test_y)]:
        acc_ours, _ = accuracy_and_loss(ours, x, y)
        assert abs(acc_ours - sk.score(x.double().numpy(), y.numpy())) <= 0.005
    w_sk = torch.from_numpy(sk.coef_)
    assert (ours.weight.double() - w_sk).norm() / w_sk.norm() < 1e-2


@pytest.mark.parametrize("l2", [1e-4, 1.0])
def test_fewer_samples_than_dimensions(data, l2):
    # Few-shot probes have a rank-deficient feature covariance: the preconditioner must still reach the optimum.
    train_x, train_y, _, _ = data
    keep = few_shot_indices(train_y, 3, NUM_CLASSES, seed=0)
    x, y = train_x[keep], train_y[keep]
    ours = fit_logistic_regression(x, y, NUM_CLASSES, l2, tol=1e-6, rtol=1e-9, device="cpu")
    sk = LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=20000).fit(x.double().numpy(), y.numpy())
    obj_sk = sklearn_objective(x, y, sk.coef_, sk.intercept_, l2)
    assert ours.objective == pytest.approx(obj_sk, rel=1e-3)  # near-separable: the objective is close to 0


def test_preconditioner_round_trip(data):
    train_x, _, _, _ = data
    pre = probe._Preconditioner.fit(probe.FeatureSpectrum.of(train_x), 1e-3, NUM_CLASSES)
    torch.testing.assert_close(pre.basis.T @ pre.basis, torch.eye(train_x.shape[1]), atol=1e-5, rtol=0)
    w, b = torch.randn(NUM_CLASSES, train_x.shape[1]), torch.randn(NUM_CLASSES)
    w2, b2 = pre.to_original(*pre.from_original(w, b))
    torch.testing.assert_close(w2, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b2, b, atol=1e-4, rtol=1e-4)


def test_default_tolerances_are_close_enough(data):
    # The defaults stop early for speed; accuracy must still match a tight scikit-learn fit within 0.5 points.
    train_x, train_y, test_x, test_y = data
    ours = fit_logistic_regression(train_x, train_y, NUM_CLASSES, 0.03, device="cpu")
    sk = LogisticRegression(C=1 / 0.03, tol=1e-9, max_iter=5000).fit(train_x.double().numpy(), train_y.numpy())
    obj_sk = sklearn_objective(train_x, train_y, sk.coef_, sk.intercept_, 0.03)
    assert ours.converged and ours.objective == pytest.approx(obj_sk, rel=1e-3)
    assert abs(accuracy_and_loss(ours, test_x, test_y)[0] - sk.score(test_x.numpy(), test_y.numpy())) <= 0.005


def test_objective_and_loss_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    clf = fit_logistic_regression(x, y, 2, l2=2.0, device="cpu", max_iter=1)
    w, b = clf.weight.double(), clf.bias.double()
    logits = x.double() @ w.T + b
    ce = torch.logsumexp(logits, 1) - logits[torch.arange(3), y]
    assert clf.loss == pytest.approx(float(ce.mean()), rel=1e-6)
    assert clf.objective == pytest.approx(float(ce.sum() + w.pow(2).sum()), rel=1e-6)


def test_bias_is_not_penalised():
    # Features all zero: only the bias can fit the 3:1 class balance; a penalised bias would not reach log(3).
    x = torch.zeros(400, 4)
    y = (torch.arange(400) % 4 == 0).long()
    clf = fit_logistic_regression(x, y, 2, l2=1e3, tol=1e-7, device="cpu")
    assert float(clf.bias[0] - clf.bias[1]) == pytest.approx(math.log(3), abs=1e-4)


@pytest.mark.parametrize("l2, neighbour", [(0.01, 0.0133), (1.0, 0.75), (0.3, 30.0)])
def test_warm_start_from_a_neighbouring_strength_keeps_going(data, l2, neighbour):
    # A sweep's neighbouring strengths start within ~1e-10 of each other's objective: the fit must not mistake
    # that small first gain for convergence and return the neighbour's solution.
    train_x, train_y, _, _ = data
    fit = functools.partial(fit_logistic_regression, train_x, train_y, NUM_CLASSES, tol=1e-6, rtol=1e-9,
                            device="cpu")
    start, cold = fit(neighbour), fit(l2)
    warm = fit(l2, init=start)
    assert warm.objective == pytest.approx(cold.objective, rel=1e-6)
    assert warm.n_iter > 1


def test_chunked_objective_equals_one_chunk(data, monkeypatch):
    train_x, train_y, _, _ = data
    whole = fit_logistic_regression(train_x, train_y, NUM_CLASSES, 1.0, device="cpu", tol=1e-6, rtol=1e-9)
    monkeypatch.setattr(probe, "_MAX_CHUNK_ELEMENTS", 300 * NUM_CLASSES)  # 1024-row floor: 2 chunks of 2000
    assert probe._chunk_rows(NUM_CLASSES) < len(train_x)
    chunked = fit_logistic_regression(train_x, train_y, NUM_CLASSES, 1.0, device="cpu", tol=1e-6, rtol=1e-9)
    assert chunked.objective == pytest.approx(whole.objective, rel=1e-6)
    assert (chunked.weight - whole.weight).norm() / whole.weight.norm() < 1e-3


def test_subnormals_work_again_after_a_fit(data):
    train_x, train_y, _, _ = data
    fit_logistic_regression(train_x, train_y, NUM_CLASSES, 1.0, device="cpu", max_iter=2)
    # The fit flushes subnormals to zero while it runs (speed); it must not leave that on for the caller.
    assert float(torch.tensor([1e-39]) * 2) > 0


def test_bad_inputs_name_the_problem(data):
    train_x, train_y, _, _ = data
    with pytest.raises(ConfigError, match="l2"):
        fit_logistic_regression(train_x, train_y, NUM_CLASSES, 0.0)
    with pytest.raises(DataError, match="label 10 outside"):
        fit_logistic_regression(train_x, torch.full_like(train_y, 10), NUM_CLASSES, 1.0)
    with pytest.raises(DataError, match="features"):
        fit_logistic_regression(train_x[:5], train_y, NUM_CLASSES, 1.0)


# ---- the protocol --------------------------------------------------------------------------------------------------

def test_sweep_picks_the_best_validation_accuracy(data):
    train_x, train_y, _, _ = data
    tr, va = stratified_split(train_y, 0.25, seed=0)
    result = sweep_l2(train_x[tr], train_y[tr], train_x[va], train_y[va], NUM_CLASSES, coarse_steps=7,
                      refine_steps=3, device="cpu")
    tried = [t[0] for t in result.trials]
    # The coarse grid (two decades apart over [1e-6, 1e6]) is all there, then 2 points per refinement round.
    assert sorted(tried[:7]) == pytest.approx([10.0 ** e for e in range(-6, 7, 2)])
    assert len(tried) <= 7 + 2 * 3
    # Brute force: fit every tried strength from scratch and measure validation accuracy independently.
    brute = {}
    for l2 in tried:
        clf = fit_logistic_regression(train_x[tr], train_y[tr], NUM_CLASSES, l2, tol=1e-6, device="cpu")
        brute[l2] = accuracy_and_loss(clf, train_x[va], train_y[va])[0]
    assert brute[result.l2] == max(brute.values())
    assert result.val_top1 == pytest.approx(brute[result.l2], abs=1.5 / len(va))
    # The choice matters here: the extremes of the range are clearly worse.
    assert result.val_top1 > max(brute[1e-6], brute[1e6]) + 0.03
    assert 1e-6 < result.l2 < 1e6


def test_stratified_split_holds_out_each_class(data):
    _, train_y, _, _ = data
    tr, va = stratified_split(train_y, 0.2, seed=3)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(train_y)))
    for c in range(NUM_CLASSES):
        assert int((train_y[va] == c).sum()) == round(0.2 * int((train_y == c).sum()))
    assert torch.equal(stratified_split(train_y, 0.2, seed=3)[1], va)
    assert not torch.equal(stratified_split(train_y, 0.2, seed=4)[1], va)


def test_few_shot_takes_k_per_class_seeded(data):
    _, train_y, _, _ = data
    idx = few_shot_indices(train_y, 4, NUM_CLASSES, seed=1)
    assert torch.equal(torch.bincount(train_y[idx], minlength=NUM_CLASSES), torch.full((NUM_CLASSES,), 4))
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(few_shot_indices(train_y, 4, NUM_CLASSES, seed=1), idx)
    assert not torch.equal(few_shot_indices(train_y, 4, NUM_CLASSES, seed=2), idx)
    counts = torch.bincount(train_y)
    c, smallest = int(counts.argmin()), int(counts.min())
    with pytest.raises(DataError, match=f"class {c} has {smallest} training samples, fewer than shots={smallest + 1}"):
        few_shot_indices(train_y, smallest + 1, NUM_CLASSES)


def test_probe_with_fixed_l2_is_one_fit_on_normalised_features(data):
    train_x, train_y, test_x, test_y = data
    # Scaled features: the probe must normalise them itself.
    out = linear_probe_features(train_x * 7, train_y, test_x * 3, test_y, num_classes=NUM_CLASSES, l2=2.0,
                                device="cpu")
    clf = fit_logistic_regression(train_x, train_y, NUM_CLASSES, 2.0, device="cpu")
    logits = clf.logits(test_x)
    assert out["top1"] == pytest.approx(float((logits.argmax(1) == test_y).float().mean()))
    assert set(out) == {"top1", "top5", "mean_per_class_recall", "num_images", "num_train", "l2"}
    assert (out["num_images"], out["num_train"], out["l2"]) == (1000, 2000, 2.0)
    assert out["top5"] >= out["top1"] > 0.7


def test_probe_sweeps_then_fits_train_plus_val(data):
    train_x, train_y, test_x, test_y = data
    out = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, seed=5,
                                coarse_steps=7, refine_steps=2, device="cpu")
    tr, va = stratified_split(train_y, 0.2, seed=5)
    alone = sweep_l2(train_x[tr], train_y[tr], train_x[va], train_y[va], NUM_CLASSES, coarse_steps=7,
                     refine_steps=2, device="cpu")
    assert out["l2"] == pytest.approx(alone.l2)
    assert out["val_top1"] == pytest.approx(alone.val_top1)
    assert out["num_train"] == 2000  # the final fit used train + validation
    final = fit_logistic_regression(train_x, train_y, NUM_CLASSES, alone.l2, device="cpu")
    acc, _ = accuracy_and_loss(final, test_x, test_y)
    assert out["top1"] == pytest.approx(acc, abs=0.003)


def test_few_shot_probe(data):
    train_x, train_y, test_x, test_y = data
    out = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, shots=5, l2=1.0,
                                device="cpu")
    assert out["num_train"] == 5 * NUM_CLASSES
    assert 0.3 < out["top1"] < 0.9  # well above chance (0.1) yet below the full-data probe
    swept = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, shots=4,
                                  coarse_steps=5, refine_steps=1, device="cpu")
    assert swept["num_train"] == 4 * NUM_CLASSES and "val_top1" in swept
    with pytest.raises(ConfigError, match="give a fixed l2"):
        linear_probe_features(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, shots=1, device="cpu")


def test_topk_metrics_by_hand():
    # 4 samples, 7 classes; predictions listed best first.
    top = torch.tensor([[0, 1, 2, 3, 4], [2, 1, 0, 3, 4], [6, 5, 4, 3, 2], [1, 0, 2, 3, 4]])
    labels = torch.tensor([0, 1, 1, 5])
    out = topk_metrics(top, labels, 7)
    assert out["top1"] == 0.25
    assert out["top5"] == 0.5
    # class 0: 1/1, class 1: 0/2, class 5: 0/1 -> mean over the 3 present classes
    assert out["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert "top5" not in topk_metrics(top[:, :5] % 5, labels % 5, 5)


# ---- features and the cache ----------------------------------------------------------------------------------------

class CountingEncoder(nn.Module):
    """An image encoder that records how it was called."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = nn.Linear(12, 4)
        self.text = nn.Linear(3, 4)
        self.calls, self.modes, self.grad = 0, [], []

    def encode_image(self, images):
        self.calls += 1
        self.modes.append(self.training)
        self.grad.append(torch.is_grad_enabled())
        return self.visual(images.flatten(1))


def image_set(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3)


def test_encode_images_eval_mode_no_grad():
    model, ds = CountingEncoder(), image_set()
    model.train()
    x, y = encode_images(model, ds, batch_size=4, device="cpu")
    assert model.calls == 3 and model.modes == [False] * 3 and model.grad == [False] * 3
    assert model.training  # restored
    assert x.dtype == torch.float32 and x.shape == (10, 4) and torch.equal(y, torch.arange(10) % 3)
    torch.testing.assert_close(x, model.visual(ds.tensors[0].flatten(1)).detach())
    x2, _ = encode_images(model, DataLoader(ds, batch_size=5), device="cpu")
    torch.testing.assert_close(x2, x)


def test_cache_is_used_on_the_second_call(tmp_path):
    model, loads = CountingEncoder(), []

    def loader():
        loads.append(1)
        return image_set()

    x1, y1 = cached_features(model, "toy/test", loader, tmp_path, batch_size=4, device="cpu")
    assert (model.calls, len(loads)) == (3, 1)
    x2, y2 = cached_features(model, "toy/test", loader, tmp_path, batch_size=4, device="cpu")
    assert (model.calls, len(loads)) == (3, 1)  # neither the data nor the model was touched
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    path = cache_path(tmp_path, weights_digest(model, scope="image"), "toy/test")
    assert set(load_file(str(path))) == {"features", "labels"}
    cached_features(model, "toy/train", loader, tmp_path, batch_size=4, device="cpu")
    assert model.calls == 6  # another split is another entry


def test_cache_keys_on_image_weights(tmp_path):
    model = CountingEncoder()
    digest = weights_digest(model, scope="image")
    with torch.no_grad():
        model.text.weight.add_(1.0)
    assert weights_digest(model, scope="image") == digest  # the text tower does not change image features
    cached_features(model, "toy/test", image_set, tmp_path, device="cpu")
    with torch.no_grad():
        model.visual.weight.add_(1.0)
    assert weights_digest(model, scope="image") != digest
    x, _ = cached_features(model, "toy/test", image_set, tmp_path, device="cpu")
    assert model.calls == 2
    torch.testing.assert_close(x, model.visual(image_set().tensors[0].flatten(1)).detach())


def test_corrupt_cache_is_extracted_again(tmp_path):
    model = CountingEncoder()
    cached_features(model, "toy/test", image_set, tmp_path, device="cpu")
    cache_path(tmp_path, weights_digest(model, scope="image"), "toy/test").write_bytes(b"not a safetensors file")
    x, _ = cached_features(model, "toy/test", image_set, tmp_path, device="cpu")
    assert model.calls == 2 and x.shape == (10, 4)
