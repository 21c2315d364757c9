"""The results JSON (write, read, update, errors) and the comparison report."""

import json

import pytest

from vlpretrain.errors import DataError
from zeroshot.report import markdown_table, write_report
from zeroshot.results import SCHEMA, ResultEntry, Results, read_results, update_results, write_results


def entry(task, bench, top1, metric="top1"):
    return ResultEntry(task, bench, metric, {"top1": top1, "mean_per_class_recall": top1 / 2, "images": 10.0},
                       root=f"/data/{bench}", format="wds")


def test_round_trip_and_documented_shape(tmp_path):
    res = Results("runs/demo/model.safetensors", None, [entry("zeroshot", "cifar10", 0.5)])
    path = write_results(tmp_path / "r.json", res)
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["model"] == "runs/demo/model.safetensors" and doc["pretrained"] is None
    assert doc["results"][0]["task"] == "zeroshot" and doc["results"][0]["metrics"]["top1"] == 0.5
    assert doc["results"][0]["root"] == "/data/cifar10" and doc["date"]
    back = read_results(path)
    assert back.results[0] == res.results[0] and back.results[0].headline == 0.5
    assert not list(tmp_path.glob("*.tmp"))


def test_update_replaces_same_task_and_benchmark_keeps_others(tmp_path):
    path = tmp_path / "r.json"
    update_results(path, "ViT-B-32", "w.pt", [entry("zeroshot", "cifar10", 0.5), entry("zeroshot", "mnist", 0.9)])
    res = update_results(path, "ViT-B-32", "w.pt", [entry("zeroshot", "cifar10", 0.6),
                                                    entry("linear_probe", "cifar10", 0.8)])
    assert [(r.task, r.benchmark, r.headline) for r in read_results(path).results] == [
        ("zeroshot", "mnist", 0.9), ("zeroshot", "cifar10", 0.6), ("linear_probe", "cifar10", 0.8)]
    assert res.get("linear_probe", "cifar10").headline == 0.8
    with pytest.raises(DataError, match="holds results of model ViT-B-32"):
        update_results(path, "RN50", None, [entry("zeroshot", "mnist", 0.1)])


def test_interrupted_block_lists_what_was_not_evaluated_until_it_is(tmp_path):
    """A stop marks the file interrupted with the pairs it did not reach; later writes of them shorten the list,
    a training block keeps it, and the block goes with the last pair."""
    path = tmp_path / "r.json"
    update_results(path, "m", None, [entry("zeroshot", "cifar10", 0.5)],
                   not_evaluated=[("zeroshot", "mnist"), ("linear_probe", "cifar10")])
    update_results(path, "m", None, [], training={"steps": 4})
    doc = json.loads(path.read_text())
    assert doc["interrupted"]["not_evaluated"] == [{"task": "zeroshot", "benchmark": "mnist"},
                                                   {"task": "linear_probe", "benchmark": "cifar10"}]
    assert doc["interrupted"]["date"] and doc["training"] == {"steps": 4}
    update_results(path, "m", None, [entry("zeroshot", "mnist", 0.9)])
    assert read_results(path).interrupted["not_evaluated"] == [{"task": "linear_probe", "benchmark": "cifar10"}]
    update_results(path, "m", None, [entry("linear_probe", "cifar10", 0.7)])
    assert "interrupted" not in json.loads(path.read_text()) and len(read_results(path).results) == 3
    path.write_text(json.dumps({**doc, "interrupted": {"not_evaluated": "mnist"}}))
    with pytest.raises(DataError, match="malformed 'interrupted'"):
        read_results(path)


def test_training_totals_sit_beside_the_entries(tmp_path):
    path = tmp_path / "r.json"
    update_results(path, "m", None, [entry("zeroshot", "cifar10", 0.5)])
    assert "training" not in json.loads(path.read_text())  # an evaluation alone writes no training block
    update_results(path, "m", None, [], training={"steps": 3, "samples": 24, "flops": 1.5e9})
    update_results(path, "m", None, [entry("zeroshot", "mnist", 0.9)])  # later evaluations keep it
    back = read_results(path)
    assert back.training == {"steps": 3, "samples": 24, "flops": 1.5e9}
    assert [r.benchmark for r in back.results] == ["cifar10", "mnist"]
    path.write_text(json.dumps({**json.loads(path.read_text()), "training": [1]}))
    with pytest.raises(DataError, match="r.json: malformed 'training'"):
        read_results(path)


def test_malformed_files_name_file_and_key(tmp_path):
    with pytest.raises(DataError, match="results file does not exist"):
        read_results(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="bad.json: not a JSON results file"):
        read_results(bad)
    bad.write_text(json.dumps({"schema": SCHEMA, "model": "m", "results": [{"task": "zeroshot", "benchmark": "x",
                                                                            "metric": "top5", "metrics": {"top1": 1}}]}))
    with pytest.raises(DataError, match=r"results\[0\]: headline metric 'top5' is not among its metrics"):
        read_results(bad)


def test_report_table_and_chart(tmp_path):
    a = write_results(tmp_path / "a.json", Results("ViT-B-32", None, [entry("zeroshot", "cifar10", 0.5),
                                                                      entry("zeroshot", "mnist", 0.25)]))
    b = write_results(tmp_path / "b.json", Results("runs/x/model.safetensors", None,
                                                   [entry("zeroshot", "cifar10", 0.75),
                                                    entry("linear_probe", "cifar10", 0.9)]))
    table = markdown_table([read_results(a), read_results(b)], [a, b])
    lines = table.splitlines()
    assert lines[0] == "| task | benchmark | metric | ViT-B-32 | model.safetensors |"
    assert "| zeroshot | cifar10 | top1 | 50.0 | 75.0 |" in lines
    assert "| zeroshot | mnist | top1 | 25.0 | — |" in lines
    assert "| linear_probe | cifar10 | top1 | — | 90.0 |" in lines
    assert lines[-1] == "| **mean** | (benchmarks) | | 37.5 (2) | 82.5 (2) |"
    md, png = write_report([a, b], tmp_path / "out")
    assert "| zeroshot | cifar10 | top1 | 50.0 | 75.0 |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_report_labels_tell_runs_apart():
    from pathlib import Path

    from zeroshot.report import column_labels

    runs = [Results(m, p, []) for m, p in (("runs/demo/model.safetensors", None),
                                           ("runs/demo-moe/model.safetensors", None),
                                           ("runs/demo-dense-more/model.safetensors", None),
                                           ("ViT-B-32", "ckpt/a/open_clip.bin"),
                                           ("ViT-B-32", "ckpt/b/open_clip.bin"),
                                           ("ViT-B-32", None))]
    paths = [Path(f"r{i}.json") for i in range(len(runs))]
    assert column_labels(runs, paths) == ["demo/model.safetensors", "demo-moe/model.safetensors",
                                          "demo-dense-more/model.safetensors", "ViT-B-32 (a/open_clip.bin)",
                                          "ViT-B-32 (b/open_clip.bin)", "ViT-B-32"]
    same = [Results("ViT-B-32", None, []), Results("ViT-B-32", None, [])]
    assert column_labels(same, [Path("x/r.json"), Path("y/r.json")]) == ["ViT-B-32 [x/r.json]", "ViT-B-32 [y/r.json]"]
