"""Few-shot adaptation of zero-shot heads (learned prompts, (IA)^3, Tip-Adapter, the zero-shot-initialised linear head,
augmented views) on the real tiny open_clip model: exact zero-step heads, learning, frozen weights, adapter files,
early stopping and the `zeroshot adapt` / `eval --adapter` CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import write_wds

import zeroshot
from vlpretrain.config import ModelConfig
from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.models import build_model, export_model, image_transform
from zeroshot.adapters import Adapter, adapted_head, initial_tensors, prompt_set, tip_logits
from zeroshot.classifier import build_classifier, default_tokenizer
from zeroshot.cli import main
from zeroshot.evaluate import run_zeroshot
from zeroshot.fewshot import AdaptConfig, adapt, fit_adapter, fit_tip

METHODS = [("prompt", False), ("prompt", True), ("ia3", False)]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny-vit").eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """The mnist benchmark in CLIP_benchmark's layout: 6 training and 3 test images per class."""
    root = tmp_path_factory.mktemp("mnist")
    classes = [str(i) for i in range(10)]
    write_wds(root, classes, [i % 10 for i in range(60)], shards=2, ext="png", split="train")
    write_wds(root, classes, [i % 10 for i in range(30)], shards=1, ext="png", split="test")
    return root


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method, class_specific", METHODS)
def test_zero_steps_reproduce_the_zero_shot_head(model, method, class_specific):
    bench = zeroshot.get_benchmark("fashion-mnist")
    classnames = [("T-shirt", "top"), *bench.classnames[1:]]  # synonyms are averaged as the ensemble does
    tokenizer = default_tokenizer(model)
    prompts = prompt_set(model, tokenizer, classnames, bench.templates)
    expected = build_classifier(model, tokenizer, classnames, bench.templates)
    feats = torch.randn(20, 128)
    fit = fit_adapter(model, method, prompts, feats, torch.arange(20) % 10, steps=0,
                      config=AdaptConfig(class_specific=class_specific))
    assert fit.steps == 0
    with torch.no_grad():
        head = adapted_head(model, method, fit.tensors, prompts)
    assert head.shape == expected.shape == (128, 10)
    torch.testing.assert_close(head, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_adapt_with_zero_steps_scores_as_zero_shot(model, mnist_root, tmp_path, method):
    result = adapt(model, "mnist", mnist_root, shots=4, method=method, config=AdaptConfig(steps=0),
                   cache_dir=tmp_path)
    data = zeroshot.get_benchmark("mnist").load(mnist_root, transform=image_transform(model, train=False))
    plain = run_zeroshot(model, data)
    for key in ("top1", "top5", "mean_per_class_recall", "images"):
        assert result.metrics[key] == plain[key]
    assert (result.metrics["shots"], result.metrics["num_train"], result.metrics["steps"]) == (4, 40, 0)
    assert result.task == f"adapt_{method}"


def test_learned_prompt_beats_a_poor_hand_prompt_on_training_images(model):
    """Images whose features are the text directions of 'a sketch of a {c}.' (plus noise), classified with the hand
    prompt 'a photo of a {c}.': the context offsets can reach the better prompt, so training accuracy rises."""
    tokenizer = default_tokenizer(model)
    classnames = ["cat", "dog", "car", "tree", "boat", "shoe", "bird", "house"]
    target = build_classifier(model, tokenizer, classnames, ["a sketch of a {c}."]).T
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8).repeat(8)
    x = F.normalize(target[y] + 0.5 * target.std() * torch.randn(len(y), 128, generator=g), dim=-1)
    prompts = prompt_set(model, tokenizer, classnames, ["a photo of a {c}."])
    cfg = AdaptConfig(lr=1e-2, val_fraction=0.0)

    def train_accuracy(steps: int) -> float:
        fit = fit_adapter(model, "prompt", prompts, x, y, config=cfg, steps=steps)
        with torch.no_grad():
            return float(((x @ adapted_head(model, "prompt", fit.tensors, prompts)).argmax(1) == y).float().mean())

    zero_shot, learned = train_accuracy(0), train_accuracy(100)
    assert zero_shot < 1.0 and learned > zero_shot


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_model_weights_are_bit_identical_after_adapting(mnist_root, tmp_path, method):
    model = tiny_model()
    model.train()
    before = state(model)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    cfg = AdaptConfig(steps=20, val_fraction=0.0)  # no early stopping: 20 steps are taken for sure
    result = adapt(model, "mnist", mnist_root, shots=4, method=method, config=cfg, cache_dir=tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                         after[k])]
    assert model.training and flags == {k: p.requires_grad for k, p in model.named_parameters()}
    # something was learned (not a silent no-op): the tensors moved from their initial values
    init = initial_tensors(model, method, prompt_set(model, None, [str(i) for i in range(10)],
                                                     zeroshot.get_benchmark("mnist").templates))
    assert result.metrics["steps"] == 20 and any(not torch.equal(result.adapter.tensors[k], init[k]) for k in init)


def test_early_stopping_returns_the_best_checked_step_and_refit_replays_it(model):
    tokenizer = default_tokenizer(model)
    prompts = prompt_set(model, tokenizer, ["cat", "dog", "car"], ["a photo of a {c}.", "a {c}."])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 128, generator=g), torch.arange(30) % 3
    vx, vy = torch.randn(9, 128, generator=g), torch.arange(9) % 3
    cfg = AdaptConfig(steps=60, eval_every=5, patience=3, lr=5e-2)
    fit = fit_adapter(model, "prompt", prompts, x, y, config=cfg, val=(vx, vy))
    checked = [s for s, _, _ in fit.history]
    assert checked[0] == 0 and all(b - a == 5 for a, b in zip(checked, checked[1:]))
    best = max(fit.history, key=lambda h: (h[1], -h[2]))
    assert (fit.steps, fit.val_top1) == (best[0], best[1])
    stopped_early = checked[-1] < 60
    assert not stopped_early or len([s for s in checked if s > fit.steps]) == cfg.patience
    again = fit_adapter(model, "prompt", prompts, x, y, config=cfg, steps=fit.steps)
    assert all(torch.equal(again.tensors[k], fit.tensors[k]) for k in fit.tensors)


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_adapter_file_round_trip_gives_the_identical_head(model, tmp_path, method):
    bench = zeroshot.get_benchmark("fashion-mnist")
    prompts = prompt_set(model, None, bench.classnames, bench.templates)
    g = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in initial_tensors(model, method,
                                                                                            prompts).items()}
    adapter = Adapter(method, tensors, bench.name, 10, zeroshot.features.weights_digest(model, scope="model"),
                      prompts.digest(), {"shots": "4"})
    path = adapter.save(tmp_path / "a.safetensors")
    back = Adapter.load(path)
    assert (back.method, back.benchmark, back.num_classes, back.info["shots"]) == (method, "fashion-mnist", 10, "4")
    back.check(model, bench.name, prompts, source=path)
    assert torch.equal(back.head(model, prompts), adapter.head(model, prompts))
    assert path.stat().st_size < 200_000 and not list(tmp_path.glob("*.tmp"))


def test_bad_settings_and_files_are_user_errors(model, tmp_path):
    with pytest.raises(ConfigError, match="steps: expected an integer >= 0"):
        AdaptConfig(steps=-1)
    with pytest.raises(ConfigError, match="val_fraction"):
        AdaptConfig(val_fraction=1.0)
    prompts = prompt_set(model, None, ["a", "b"], ["a photo of a {c}."])
    with pytest.raises(ConfigError, match=r"n_ctx: expected 1\.\.14"):
        initial_tensors(model, "prompt", prompts, n_ctx=15)
    with pytest.raises(ConfigError, match="method: expected one of prompt, ia3, tip"):
        initial_tensors(model, "lora", prompts)
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors: not a safetensors adapter file"):
        Adapter.load(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="adapter file does not exist"):
        Adapter.load(tmp_path / "none.safetensors")


# ---- the CLI -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exported tiny models with different weights (an architecture name would be re-initialised each load)."""
    folder = tmp_path_factory.mktemp("models")
    return [export_model(tiny_model(seed), ModelConfig(name="tiny-vit"), folder / f"m{seed}.safetensors")
            for seed in (0, 1)]


def test_adapt_cli_end_to_end_then_eval_with_the_adapter(exported, mnist_root, tmp_path, capsys):
    out, adapter = tmp_path / "results.json", tmp_path / "adapter.safetensors"
    common = ["--model", str(exported[0]), "--benchmark", "mnist", "--root", str(mnist_root), "--out", str(out)]
    assert main(["adapt", *common, "--shots", "4", "--steps", "10", "--save", str(adapter),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "mnist: adapt_prompt top1=" in printed and f"wrote {adapter}" in printed
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["task"] == "adapt_prompt" and entry["metric"] == "top1"
    assert entry["metrics"]["shots"] == 4 and entry["metrics"]["num_train"] == 40 and entry["metrics"]["images"] == 30
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2  # the probe's train and test features: prompt
    # trains on the shots alone by default (no views)

    assert main(["eval", *common, "--adapter", str(adapter), "--no-progress"]) == 0
    (again,) = json.loads(out.read_text())["results"]  # same task and benchmark: the entry is replaced
    for key in ("top1", "top5", "mean_per_class_recall", "images", "shots"):
        assert again["metrics"][key] == entry["metrics"][key]  # the saved head classifies as the fitted one did

    assert main(["eval", *common[:-2], "--out", str(tmp_path / "zs.json"), "--no-progress"]) == 0
    assert main(["probe", *common, "--shots", "4", "--l2", "1.0", "--cache-dir", str(tmp_path / "cache")]) == 0
    zeroshot.update_results(out, str(exported[0]), None, zeroshot.read_results(tmp_path / "zs.json").results)
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    for task in ("zeroshot", "adapt_prompt (4-shot)", "linear_probe (4-shot)"):
        assert f"| {task} | mnist | top1 |" in md


@pytest.mark.parametrize("case", ["benchmark", "model", "not an adapter"])
def test_a_mismatched_adapter_is_refused_with_one_line(exported, mnist_root, tmp_path, capsys, case):
    adapter = tmp_path / "adapter.safetensors"
    assert main(["adapt", "--model", str(exported[0]), "--benchmark", "mnist", "--root", str(mnist_root),
                 "--shots", "2", "--steps", "0", "--method", "ia3", "--save", str(adapter),
                 "--cache-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    model, bench = exported[0], "mnist"
    if case == "benchmark":
        bench = "fashion-mnist"
        write_wds(tmp_path / "fashion-mnist", [str(i) for i in range(10)], list(range(10)), shards=1, ext="png")
    elif case == "model":
        model = exported[1]
    else:
        adapter.write_bytes(b"\0" * 64)
    root = tmp_path if case == "benchmark" else mnist_root
    assert main(["eval", "--model", str(model), "--benchmark", bench, "--root", str(root),
                 "--adapter", str(adapter), "--no-progress"]) == 2
    err = capsys.readouterr().err
    expected = {"benchmark": f"error: {adapter}: adapter is for benchmark mnist, not fashion-mnist",
                "model": f"error: {adapter}: adapter was fitted on other model weights",
                "not an adapter": f"error: {adapter}: not a safetensors adapter file"}[case]
    assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


# ---- Tip-Adapter and early stopping --------------------------------------------------------------------------------

def test_tip_logits_equal_the_formula_on_a_hand_worked_case():
    """3 classes x 2 shots in 2-D, alpha 2, beta 3: logit_scale * f.w_c + alpha * sum over class-c keys of
    exp(-beta * (1 - f.key)), computed number by number."""
    import math

    angles = [0.0, 0.3, 2.0, 2.4, 4.0, 4.5]  # two keys per class, classes 0, 0, 1, 1, 2, 2
    keys = torch.tensor([[math.cos(t), math.sin(t)] for t in angles])
    values = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    head = torch.tensor([[0.6, -0.2, 0.1], [0.8, 0.9, -1.0]])
    f = torch.tensor([[3.0, 4.0]])  # normalised to (0.6, 0.8) inside
    got = tip_logits(f, head, 10.0, {"keys": keys, "values": values, "alpha": torch.tensor([2.0]),
                                     "beta": torch.tensor([3.0])})
    fx, fy = 0.6, 0.8
    expected = []
    for c in range(3):
        zs = 10.0 * (fx * head[0, c].item() + fy * head[1, c].item())
        cache = sum(math.exp(-3.0 * (1 - (fx * math.cos(t) + fy * math.sin(t)))) for t in angles[2 * c:2 * c + 2])
        expected.append(zs + 2.0 * cache)
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-5, rtol=0)


def test_a_cache_of_exact_one_hot_shots_classifies_those_shots():
    """A zero-shot head that calls everything class 0; the cache of the shots themselves (one per class, the
    configured alpha and beta) puts every shot in its own class."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 16, generator=g), torch.arange(5)
    head = torch.zeros(16, 5)
    head[:, 0] = F.normalize(x.mean(0), dim=0)
    assert (tip_logits(x, head, 10.0, {**initial_tensors_tip(5, 16)}).argmax(1) == 0).all()  # alpha 0: zero-shot
    fit = fit_tip(x, y, head, 10.0, 5, config=AdaptConfig(tip_alpha=50.0, tip_beta=20.0))
    assert torch.equal(fit.tensors["values"], torch.eye(5)) and fit.val_top1 is None
    assert torch.equal(tip_logits(x, head, 10.0, fit.tensors).argmax(1), y)


def initial_tensors_tip(classes: int, dim: int) -> dict[str, torch.Tensor]:
    return {"keys": torch.zeros(0, dim), "values": torch.zeros(0, classes), "alpha": torch.zeros(1),
            "beta": torch.ones(1)}


def test_tip_alpha_and_beta_are_the_best_leave_one_out_pair():
    """With two or more shots per class, the chosen (alpha, beta) scores the shots, each against the cache of the
    others, at least as well as every pair of the grid (brute force over the grid here)."""
    from zeroshot.fewshot import TIP_ALPHAS, TIP_BETAS

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 8, generator=g)
    y = torch.arange(12) % 3
    x = centres[y] + 0.8 * torch.randn(12, 8, generator=g)
    head = torch.randn(8, 3, generator=g)
    fit = fit_tip(x, y, head, 5.0, 3)

    def loo_top1(alpha: float, beta: float) -> float:
        hits = 0
        for i in range(12):
            rest = [j for j in range(12) if j != i]
            t = {"keys": F.normalize(x[rest], dim=-1), "values": F.one_hot(y[rest], 3).float(),
                 "alpha": torch.tensor([alpha]), "beta": torch.tensor([beta])}
            hits += int(tip_logits(x[i:i + 1], head, 5.0, t).argmax(1).item() == y[i].item())
        return hits / 12

    best = max(loo_top1(a, b) for a in TIP_ALPHAS.tolist()[::5] for b in TIP_BETAS.tolist()[::4])
    assert fit.val_top1 == pytest.approx(loo_top1(fit.tensors["alpha"].item(), fit.tensors["beta"].item()))
    assert fit.val_top1 >= best


def test_tip_adapter_round_trips_through_eval_adapter(exported, mnist_root, tmp_path, capsys):
    out, adapter = tmp_path / "results.json", tmp_path / "tip.safetensors"
    common = ["--model", str(exported[0]), "--benchmark", "mnist", "--root", str(mnist_root), "--out", str(out)]
    assert main(["adapt", *common, "--shots", "4", "--method", "tip", "--save", str(adapter),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["task"] == "adapt_tip" and entry["metrics"]["num_train"] == 40 and entry["metrics"]["steps"] == 0
    saved = Adapter.load(adapter)
    assert saved.method == "tip" and tuple(saved.tensors["keys"].shape) == (40, 128)
    _evaluates_as_fitted_and_only_on_its_model(common, out, entry, adapter, exported[1], mnist_root, capsys)


def test_early_stopping_is_off_with_one_held_out_shot_per_class(model, mnist_root, tmp_path):
    """At 4 shots a quarter held out is one image per class: too coarse to choose a step (the (IA)^3 run of issue 26
    stopped at step 10 so), so every step runs and no validation score is reported."""
    cfg = AdaptConfig(steps=3, eval_every=1, patience=1)
    result = adapt(model, "mnist", mnist_root, shots=4, method="ia3", config=cfg, cache_dir=tmp_path)
    assert result.metrics["steps"] == 3 and "val_top1" not in result.metrics


# ---- the zero-shot-initialised linear head and augmented views -----------------------------------------------------

def test_linear_objective_value_and_gradient_on_a_hand_worked_case():
    """Two orthogonal images of classes 0 and 1, head = zero-shot head = I, logit scale 2, l2 0.5: mean CE is
    log(1 + e^-2), the penalty 0, and the gradient s/N X^T (P - Y) + l2 (W - W0) has entries -+s/2 sigmoid(-2)."""
    import math

    from zeroshot.fewshot import linear_objective

    x, y, w0 = torch.eye(2, dtype=torch.float64), torch.tensor([0, 1]), torch.eye(2, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    value = linear_objective(w, x, y, w0, 2.0, 0.5)
    value.backward()
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)
    q = 1 / (1 + math.exp(2))  # sigmoid(-2)
    torch.testing.assert_close(w.grad, torch.tensor([[-q, q], [q, -q]], dtype=torch.float64), atol=1e-12, rtol=0)
    w2 = (w0 + 1).requires_grad_(True)  # off the prior: the penalty is 0.5 * 0.5 * 4 and its gradient l2 * 1
    value = linear_objective(w2, x, y, w0, 2.0, 0.5)
    value.backward()
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2)) + 1.0, abs=1e-12)
    torch.testing.assert_close(w2.grad, torch.tensor([[-q, q], [q, -q]], dtype=torch.float64) + 0.5, atol=1e-12,
                               rtol=0)


def test_fit_linear_reaches_the_closed_form_optimum():
    """On the case above the optimum is W0 + a [[1, -1], [-1, 1]], a solving 4 l2 a = 2 s sigmoid(-s (1 + 2a))
    (stationarity in a; solved here by bisection)."""
    import math

    from zeroshot.fewshot import fit_linear

    s, l2 = 2.0, 0.05
    lo, hi = 0.0, 100.0
    for _ in range(200):
        a = (lo + hi) / 2
        if 4 * l2 * a - 2 * s / (1 + math.exp(s * (1 + 2 * a))) > 0:
            hi = a
        else:
            lo = a
    w = fit_linear(torch.eye(2) * 3, torch.tensor([0, 1]), torch.eye(2), s, l2)  # rows are normalised inside
    expected = torch.eye(2) + a * torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)


def test_infinite_penalty_or_no_iterations_give_the_zero_shot_head_exactly(model, mnist_root, tmp_path):
    import math

    from zeroshot.fewshot import fit_linear

    g = torch.Generator().manual_seed(0)
    x, y, w0 = torch.randn(20, 8, generator=g), torch.arange(20) % 4, torch.randn(8, 4, generator=g)
    assert torch.equal(fit_linear(x, y, w0, 10.0, math.inf), w0)
    assert torch.equal(fit_linear(x, y, w0, 10.0, 1e-3, max_iter=0), w0)
    assert not torch.equal(fit_linear(x, y, w0, 10.0, 1e-3), w0)
    result = adapt(model, "mnist", mnist_root, shots=4, method="linear", config=AdaptConfig(l2=math.inf),
                   cache_dir=tmp_path)
    data = zeroshot.get_benchmark("mnist").load(mnist_root, transform=image_transform(model, train=False))
    plain = run_zeroshot(model, data)
    for key in ("top1", "top5", "mean_per_class_recall", "images"):
        assert result.metrics[key] == plain[key]
    torch.testing.assert_close(result.adapter.tensors["weight"], build_classifier(model, None, *_mnist_prompts()),
                               atol=1e-6, rtol=0)


def _mnist_prompts():
    bench = zeroshot.get_benchmark("mnist")
    return bench.classnames, bench.templates


def test_clap_strengths_are_each_classes_mean_zero_shot_probability():
    from zeroshot.fewshot import clap_l2

    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits (scale 3): [3, 0], [0, 3], [3/sqrt2, 3/sqrt2]; own-class probabilities: sigmoid(3), sigmoid(3), 1/2
    sig = 1 / (1 + torch.exp(torch.tensor(-3.0)))
    expected = torch.stack([sig, (sig + 0.5) / 2]) * 2 / 2
    torch.testing.assert_close(clap_l2(x, y, w0, 3.0, 2), expected)


def test_cross_validation_holds_out_whole_shots_with_their_views():
    """Folds are whole shots (the i-th shot of each class in fold i mod folds); a held-out shot's views never train;
    the reported score of the chosen strength is its cross-validated top-1 over the held-out shots (and their views),
    recomputed here fold by fold."""
    from zeroshot.fewshot import _with_views, choose_linear_l2, fit_linear, shot_folds

    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    assert shot_folds(y, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g) + 2 * F.one_hot(y, 6).float()
    views = (torch.randn(16, 6, generator=g), torch.arange(8).repeat_interleave(2))
    keep = torch.tensor([True, False, True, True, False, False, True, True])
    tx, ty = _with_views(x, y, views, keep)
    assert torch.equal(tx, torch.cat([x[keep], views[0][keep.repeat_interleave(2)]]))
    assert torch.equal(ty, torch.cat([y[keep], y[keep].repeat_interleave(2)]))
    w0 = torch.randn(6, 2, generator=g)
    fold = shot_folds(y, 4)
    for score_views in (False, True):
        l2, top1, trials = choose_linear_l2(x, y, w0, 5.0, views=views, folds=4, grid=(1e-2, 1.0), refine=False,
                                            score_views=score_views)
        assert [t[0] for t in trials] == [1.0, 1e-2] and l2 in (1.0, 1e-2)
        hits = 0
        for f in range(4):
            w = fit_linear(*_with_views(x, y, views, fold != f), w0, 5.0, l2)
            vx, vy = _with_views(x, y, views, fold == f) if score_views else (x[fold == f], y[fold == f])
            hits += int(((F.normalize(vx, dim=-1) @ w).argmax(1) == vy).sum())
        assert top1 == pytest.approx(hits / (24 if score_views else 8)) and top1 == max(t[1] for t in trials)


def test_augmented_views_are_seeded_and_differ_from_the_image(model, mnist_root, tmp_path):
    import numpy as np

    from zeroshot.probe import split_features
    from zeroshot.views import Augment, crop_box, view_features

    for seed in range(20):
        left, top, w, h = crop_box(np.random.default_rng(seed), 28, 20)
        assert 0 <= left and left + w <= 28 and 0 <= top and top + h <= 20 and 0.5 * 560 * 0.9 <= w * h <= 560
    bench = zeroshot.get_benchmark("mnist")
    keep = torch.tensor([0, 3, 7])
    aug = Augment(views=3)
    a = view_features(model, bench, mnist_root, keep, aug, tmp_path / "a", seed=0)
    b = view_features(model, bench, mnist_root, keep, aug, tmp_path / "b", seed=0)
    c = view_features(model, bench, mnist_root, keep, aug, tmp_path / "c", seed=1)
    assert a[0].shape == (9, 128) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    train_x, train_y = split_features(model, bench, mnist_root, ("train",), cache_dir=tmp_path / "a")["train"]
    assert torch.equal(a[1], train_y[keep].repeat_interleave(3))
    plain = train_x[keep].repeat_interleave(3, dim=0)
    assert (a[0] - plain).abs().amax(dim=1).min() > 1e-4  # every view is another image than the shot itself


def test_linear_adapter_with_views_round_trips_through_eval_adapter(exported, mnist_root, tmp_path, capsys):
    out, adapter = tmp_path / "results.json", tmp_path / "linear.safetensors"
    common = ["--model", str(exported[0]), "--benchmark", "mnist", "--root", str(mnist_root), "--out", str(out)]
    assert main(["adapt", *common, "--shots", "4", "--method", "linear", "--augment", "2", "--save", str(adapter),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["task"] == "adapt_linear" and entry["metrics"]["augment"] == 2
    assert entry["metrics"]["num_train"] == 40 and "val_top1" in entry["metrics"]
    saved = Adapter.load(adapter)
    assert saved.method == "linear" and tuple(saved.tensors["weight"].shape) == (128, 10)
    assert saved.info["augment"] == "2" and float(saved.info["l2"]) > 0
    assert AdaptConfig().views_for("linear") == 10 and AdaptConfig().views_for("prompt") == 0
    assert AdaptConfig(augment=5).views_for("tip") == 0  # Tip-Adapter's keys are the shots' own features
    _evaluates_as_fitted_and_only_on_its_model(common, out, entry, adapter, exported[1], mnist_root, capsys)


def _evaluates_as_fitted_and_only_on_its_model(common, out, entry, adapter, other_model, mnist_root, capsys) -> None:
    """`zeroshot eval --adapter` gives the metrics the fit reported; another model's weights are refused in a line."""
    assert main(["eval", *common, "--adapter", str(adapter), "--no-progress"]) == 0
    (again,) = json.loads(out.read_text())["results"]
    for key in ("top1", "top5", "mean_per_class_recall", "images", "shots"):
        assert again["metrics"][key] == entry["metrics"][key]
    capsys.readouterr()
    assert main(["eval", "--model", str(other_model), "--benchmark", "mnist", "--root", str(mnist_root),
                 "--adapter", str(adapter), "--no-progress"]) == 2
    assert "adapter was fitted on other model weights" in capsys.readouterr().err
