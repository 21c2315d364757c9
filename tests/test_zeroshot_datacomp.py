"""DataComp's suite: its six extra tasks against DataComp's metric formulas re-computed by hand, its folder names,
the DataComp score as aggregate_scores computes it, and `zeroshot eval --suite` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import (
    PRIMARIES,
    ColourClip,
    write_cifar,
    write_wds,
    write_wds_captions,
    write_wds_grouped,
    write_winogavil,
)
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score
from torchvision.transforms import functional as TF

import zeroshot
from zeroshot.cli import main
from zeroshot.datasets import get_benchmark
from zeroshot.group_metrics import (
    association_metrics,
    dollar_street_metrics,
    fmow_metrics,
    iwildcam_metrics,
    macro_f1,
)
from zeroshot.results import ResultEntry, Results, write_results
from zeroshot.suites import get_suite, locate_suite, score_suite

COLOURS = ["red", "green", "blue"]


def solid(colour: str, shade: float = 1.0) -> Image.Image:
    return Image.new("RGB", (8, 8), tuple(int(shade * c) for c in PRIMARIES[colour]))


def wilds_groups(correct, groups):
    """DataComp's standard_group_eval (WILDS grouper + avg_over_groups), written out: groups 0..max, NaN when
    empty, the worst over non-empty groups."""
    correct, groups = np.asarray(correct, dtype=float), np.asarray(groups)
    per, count = {}, {}
    for g in range(groups.max() + 1):
        count[g] = int((groups == g).sum())
        per[g] = correct[groups == g].mean() if count[g] else float("nan")
    return correct.mean(), per, count, min(v for g, v in per.items() if count[g])


# 12 samples: colour shown (= the ColourClip prediction), label, region; 9 right
TWELVE = [("red", 0, 0), ("red", 0, 0), ("green", 1, 0), ("blue", 1, 0),
          ("green", 1, 1), ("blue", 0, 1), ("red", 2, 1), ("blue", 2, 1),
          ("red", 0, 3), ("green", 1, 3), ("blue", 2, 3), ("blue", 2, 3)]


def test_geode_worst_region_on_twelve_samples_equals_datacomp_by_hand(tmp_path):
    root = write_wds_grouped(tmp_path / "wds_geode_test", COLOURS, ["a {c} thing."], [solid(c) for c, _, _ in TWELVE],
                             [y for _, y, _ in TWELVE], [[r, 7] for *_, r in TWELVE])
    m = zeroshot.evaluate(ColourClip(), "geode", tmp_path, tokenizer=ColourClip().tokenizer, transform=TF.to_tensor,
                          batch_size=5, progress=False)
    correct = [COLOURS.index(c) == y for c, y, _ in TWELVE]
    avg, per, count, worst = wilds_groups(correct, [r for *_, r in TWELVE])
    # by hand: region 0: 3 of 4, region 1: 2 of 4, region 2: empty, region 3: 4 of 4 -> worst 0.5
    assert (avg, per[0], per[1], per[3], worst) == (9 / 12, 0.75, 0.5, 1.0, 0.5)
    assert m["acc_wg"] == m["headline"] == worst and m["acc_avg"] == avg == m["top1"]
    assert [m[f"acc_region:{g}"] for g in (0, 1, 3)] == [per[0], per[1], per[3]] and math.isnan(m["acc_region:2"])
    assert [m[f"count_region:{g}"] for g in range(4)] == [4, 4, 0, 4]
    assert get_benchmark("geode").locate(tmp_path)[0] == root  # found by DataComp's folder name


def test_fmow_worst_region_and_year_and_iwildcam_macro_f1():
    logits = torch.eye(3)[torch.tensor([0, 0, 1, 2, 1, 2, 0, 2, 0, 1, 2, 2])]
    labels = torch.tensor([y for _, y, _ in TWELVE])
    region = torch.tensor([r for *_, r in TWELVE])
    year = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 2])
    m = fmow_metrics(logits, labels, torch.stack([region, year, labels], 1))
    correct = (logits.argmax(1) == labels).tolist()
    _, by_region, _, worst_region = wilds_groups(correct, region)
    _, by_year, _, worst_year = wilds_groups(correct, year)
    # by hand: years 0, 1, 2 get 3/4, 2/4, 4/4 right; regions 0, 1, 3 get 3/4, 2/4, 4/4
    assert m["acc_worst_region"] == worst_region == 0.5 and m["acc_worst_year"] == worst_year == 0.5
    assert m["acc_year:2"] == by_year[2] == 1.0 and m["acc_region:1"] == by_region[1]
    # iWildCam: scikit-learn's macro F1 over the classes present, as WILDS' F1(average="macro") calls it
    pred = logits.argmax(1)
    want = f1_score(labels.numpy(), pred.numpy(), average="macro", labels=np.unique(labels.numpy()))
    assert macro_f1(pred, labels) == pytest.approx(want, abs=1e-12)
    assert iwildcam_metrics(logits, labels, None)["F1-macro_all"] == pytest.approx(want, abs=1e-12)
    # a predicted class absent from the labels counts against precision only
    assert macro_f1(torch.tensor([0, 0, 5]), torch.tensor([0, 1, 1])) == pytest.approx(
        f1_score([0, 1, 1], [0, 0, 5], average="macro", labels=[0, 1]))


def test_dollar_street_top5_worst_income_group():
    torch.manual_seed(0)
    logits = torch.randn(12, 8)
    labels = torch.randint(0, 8, (12,))
    income = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    m = dollar_street_metrics(logits, labels, torch.stack([income, income, income], 1))
    hit = [(lab in row.argsort(descending=True)[:5].tolist()) for row, lab in zip(logits, labels.tolist())]
    avg, per, _, worst = wilds_groups(hit, income)
    assert m["acc_top5_wg"] == pytest.approx(worst) and m["acc_top5_avg"] == pytest.approx(avg)
    assert [m[f"acc_top5_income_ds:{g}"] for g in range(3)] == pytest.approx([per[g] for g in range(3)])


def test_winogavil_jaccard_groups_equal_sklearn():
    rng = np.random.default_rng(0)
    scores, truths, want = [], [], {5: [], 6: [], 10: [], 12: []}
    for n in [5, 6, 10, 12, 5, 12, 10, 6]:
        s, t = torch.tensor(rng.permutation(n), dtype=torch.float), torch.zeros(n, dtype=torch.bool)
        t[torch.tensor(rng.choice(n, size=int(rng.integers(1, 4)), replace=False))] = True
        # DataComp: the k highest scores (numpy argsort()[-k:]) against the truth, sklearn's jaccard_score
        top = np.argsort(s.numpy())[-int(t.sum()):]
        want[n].append(jaccard_score(t.numpy(), np.isin(np.arange(n), top)))
        scores.append(s)
        truths.append(t)
    m = association_metrics(scores, truths)
    assert m["jaccard_score_10-12"] == pytest.approx(np.mean(want[10] + want[12]))
    assert m["jaccard_score_5-6"] == pytest.approx(np.mean(want[5] + want[6]))
    assert m["avg_jaccard_score"] == pytest.approx(np.mean(sum(want.values(), [])))
    assert m["jaccard_score_12"] == pytest.approx(np.mean(want[12])) and m["headline"] == m["jaccard_score_10-12"]


def test_winogavil_end_to_end_from_its_export(tmp_path):
    # the cue's prompt ("A red") embeds as the red axis: candidates rank by their colour's cosine with red,
    # c0 1, c6 .98, c3 .93, c8 .79, c1 .71, c5 .37, c7 .19, then c2, c4, c9 at 0
    rgb = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (255, 100, 0), (0, 0, 255),
           (100, 255, 0), (255, 50, 0), (50, 0, 255), (255, 200, 0), (0, 255, 255)]
    five, ten = [Image.new("RGB", (8, 8), c) for c in rgb[:5]], [Image.new("RGB", (8, 8), c) for c in rgb]
    names = [f"c{i}" for i in range(10)]
    write_winogavil(tmp_path / "wds_winogavil_test", [
        ("Red", names[:5], ["c0", "c2"], five),  # predicted {c0, c3}: jaccard 1/3
        ("red", names, ["c0", "c6", "c3"], ten),  # predicted {c0, c6, c3}: 1
        ("RED", names, json.dumps(["c1", "c9"]), ten),  # predicted {c0, c6}: 0
    ])
    model = ColourClip("A {}")
    m = zeroshot.evaluate(model, "winogavil", tmp_path, tokenizer=model.tokenizer, transform=TF.to_tensor,
                          progress=False)
    assert m["jaccard_score_5"] == pytest.approx(1 / 3) and m["jaccard_score_10-12"] == pytest.approx(0.5)
    assert m["headline"] == m["jaccard_score_10-12"] and m["avg_jaccard_score"] == pytest.approx((1 / 3 + 1) / 3)
    assert m["instances"] == 3 and m["images"] == 25 and math.isnan(m["jaccard_score_6"])


def test_datacomp_folder_names_found_under_one_root(tmp_path):
    write_wds(tmp_path / "wds_vtab-cifar100_test", [str(i) for i in range(100)], [1, 2], shards=1)
    write_wds(tmp_path / "wds_imagenet_sketch_test", ["a", "b"], [0, 1], shards=1)
    write_wds(tmp_path / "wds_renderedsst2_test", ["negative", "positive"], [0, 1], shards=1)
    write_wds_grouped(tmp_path / "wds_wilds-fmow_test", COLOURS, ["{c}"], [solid("red")], [0], [[0, 0, 0]])
    write_wds_grouped(tmp_path / "wds_dollar_street_test", COLOURS, ["{c}"], [solid("red")], [0], [[0, 0, 0]])
    (tmp_path / "wds_mscoco_2014_5k_test_image_text_retrieval_test").mkdir()  # DataComp's retrieval folder name
    write_wds_captions(tmp_path / "wds_mscoco_2014_5k_test_image_text_retrieval_test", [["a"], ["b"]], shards=1)
    found, not_found = locate_suite("datacomp", tmp_path)
    assert found == ["cifar100", "imagenet-sketch", "rendered-sst2", "mscoco", "fmow", "dollar-street"]
    assert len(not_found) == 32 and not_found["winogavil"] == f"no folder wds_winogavil_test/ or winogavil/ under {tmp_path}"
    assert not_found["caltech101"] == f"no folder wds_vtab-caltech101_test/ or caltech101/ under {tmp_path}"
    assert get_benchmark("imagenet-sketch").locate(tmp_path)[0] == tmp_path / "wds_imagenet_sketch_test"


def entry(bench: str, metric: str, value: float, task: str = "zeroshot") -> ResultEntry:
    return ResultEntry(task, bench, metric, {metric: value, "headline": value})


def test_datacomp_score_is_aggregate_scores_mean(tmp_path):
    suite = get_suite("datacomp")
    assert len(suite.tasks) == 38 and suite.groups["VTAB"][0] == "Caltech-101"
    rng = np.random.default_rng(1)
    values = {t.label: float(rng.random()) for t in suite.tasks}
    tasks = {t.label: t for t in suite.tasks}
    entries = [entry(t.benchmark, t.metric, values[t.label],
                     "retrieval" if t.benchmark in ("flickr30k", "mscoco") else "zeroshot") for t in suite.tasks]
    # DataComp's results file (one JSON line per task, metrics.main_metric) and aggregate_scores' arithmetic
    lines = [json.dumps({"key": label, "dataset": label, "metrics": {"main_metric": v}}) for label, v in values.items()]
    (tmp_path / "eval_results.jsonl").write_text("\n".join(lines) + "\n")
    rows = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    results = {r["dataset"]: r["metrics"]["main_metric"] for r in rows}
    average = np.mean(list(results.values()))
    vtab = np.mean([results[d] for d in suite.groups["VTAB"]])

    path = write_results(tmp_path / "results.json", Results("m", None, entries))
    score = score_suite(suite, zeroshot.read_results(path).results)
    assert score.name == "datacomp_score" and score.value == pytest.approx(average, abs=1e-12)
    assert score.groups["VTAB"]["value"] == pytest.approx(vtab) and score.missing == []
    assert score.groups["ImageNet"]["value"] == results["ImageNet 1k"]

    # six tasks missing (never written) and one NaN (dropped by aggregate_scores' dropna): named for the 31 it covers
    gone = {"WinoGAViL", "iWildCam", "Camelyon17", "FMoW", "Dollar Street", "GeoDE"}
    kept = [e for e in entries if e.benchmark not in {tasks[g].benchmark for g in gone}]
    kept[0] = entry(kept[0].benchmark, kept[0].metric, float("nan"))
    write_results(path, Results("m", None, kept))
    score = score_suite("datacomp", zeroshot.read_results(path).results)
    left = [v for label, v in values.items() if label not in gone and label != "Caltech-101"]
    assert score.name == "datacomp_score_31_of_38" and score.value == pytest.approx(np.mean(left))
    assert score.missing == ["caltech101", "winogavil", "iwildcam", "camelyon17", "fmow", "dollar-street", "geode"]
    assert score.groups["VTAB"]["tasks"] == 12 and score.groups["Retrieval"]["tasks"] == 2


def test_eval_suite_end_to_end_then_report(tmp_path, capsys):
    root = tmp_path / "datacomp"
    write_cifar(root / "wds_cifar10_test" / "cifar-10-batches-py", [i % 10 for i in range(12)], "test_batch")
    write_wds(root / "wds_vtab-svhn_test", [str(i) for i in range(10)], [i % 10 for i in range(10)], shards=1)
    write_wds_grouped(root / "wds_geode_test", COLOURS, ["a photo of a {c}."], [solid(c) for c, _, _ in TWELVE],
                      [y for _, y, _ in TWELVE], [[r, 0] for *_, r in TWELVE])
    out = tmp_path / "results.json"
    assert main(["eval", "--model", "tiny-vit", "--suite", "datacomp", "--root", str(root), "--out", str(out),
                 "--batch-size", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "datacomp: 3 of 38 tasks found" in printed and "missing: winogavil (" in printed
    doc = json.loads(out.read_text())
    got = {r["benchmark"]: r for r in doc["results"]}
    assert set(got) == {"cifar10", "svhn", "geode"} and got["geode"]["metric"] == "acc_wg"
    block = doc["suites"]["datacomp"]
    mean = np.mean([got[b]["metrics"][m] for b, m in (("cifar10", "top1"), ("svhn", "top1"), ("geode", "acc_wg"))])
    assert block["score"] == "datacomp_score_3_of_38" and block["value"] == pytest.approx(mean)
    assert len(block["missing"]) == 35 and f"datacomp_score_3_of_38: {mean:.4f}" in printed
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Suite: datacomp" in md and "| GeoDE | geode | acc_wg |" in md and "`datacomp_score_3_of_38`" in md


def test_broken_exports_are_one_line_user_errors(tmp_path, capsys):
    geode = write_wds_grouped(tmp_path / "wds_geode_test", COLOURS, ["{c}"], [solid("red")] * 2, [0, 1], [[0], [1]])
    wino = write_winogavil(tmp_path / "wds_winogavil_test", [("red", ["a", "b"], ["a"], [solid("red")])])
    for bench, message in [("geode", f"{geode / 'test' / '0.tar'}: sample 's000000' has 1 metadata fields, geode needs "
                                     "2 (region, country)"),
                           ("winogavil", f"{wino / 'test' / '0.tar'}: sample 'w00000': candidate 1 ('b') has no image")]:
        assert main(["eval", "--model", "tiny-vit", "--benchmark", bench, "--root", str(tmp_path),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert main(["eval", "--model", "tiny-vit", "--suite", "datacomp", "--root", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"error: --root: {tmp_path / 'empty'} is not a folder\n"


def test_run_suite_from_python(tmp_path):
    write_wds_grouped(tmp_path / "wds_geode_test", COLOURS, ["a {c} thing."], [solid(c) for c, _, _ in TWELVE],
                      [y for _, y, _ in TWELVE], [[r, 0] for *_, r in TWELVE])
    run = zeroshot.run_suite(ColourClip(), "datacomp", tmp_path, tokenizer=ColourClip().tokenizer,
                             transform=TF.to_tensor, progress=False)
    assert [e.benchmark for e in run.entries] == ["geode"] and len(run.not_found) == 37
    assert run.score.name == "datacomp_score_1_of_38" and run.score.value == 0.5  # GeoDE's worst region, by hand
    assert run.score.groups["Fairness"] == {"value": 0.5, "tasks": 1.0, "of": 2.0}
    assert math.isnan(run.score.groups["VTAB"]["value"])
