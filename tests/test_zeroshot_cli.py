"""`zeroshot list | eval | report` end to end on a tiny random model and fake data in two layouts."""

import json

import pytest
from helpers import write_cifar, write_wds

from zeroshot.cli import main


def test_list_prints_every_benchmark(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["benchmark", "classes", "templates", "metric", "formats"]
    assert out[-1].endswith("benchmarks") and int(out[-1].split()[0]) >= 30
    row = next(line for line in out if line.startswith("fgvc-aircraft "))
    assert row.split()[:4] == ["fgvc-aircraft", "100", "2", "mean_per_class_recall"] and "torchvision, wds" in row


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    write_cifar(root / "cifar10" / "cifar-10-batches-py", [i % 10 for i in range(24)], "test_batch")
    write_wds(root / "mnist", [str(i) for i in range(10)], [i % 10 for i in range(12)], shards=2, ext="png")
    return root


def test_eval_then_report(collection, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "cifar10,mnist", "--root", str(collection),
                 "--out", str(out), "--max-images", "20", "--batch-size", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "cifar10: top1=" in printed and "(torchvision at" in printed and "(wds at" in printed
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny-vit" and doc["pretrained"] is None
    got = {r["benchmark"]: r for r in doc["results"]}
    assert got["cifar10"]["metrics"]["images"] == 20 and got["mnist"]["metrics"]["images"] == 12
    assert got["cifar10"]["format"] == "torchvision" and got["mnist"]["format"] == "wds"
    assert set(got["cifar10"]["metrics"]) == {"top1", "top5", "mean_per_class_recall", "headline", "images"}
    assert got["mnist"]["root"] == str(collection / "mnist") and got["mnist"]["task"] == "zeroshot"

    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "| zeroshot | cifar10 | top1 |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "nope"], "error: benchmark: unknown benchmark 'nope'"),
    (["--benchmark", "cifar100"], "error: {root}: no cifar100 test data found; expected [torchvision] cifar-100-python"),
    (["--benchmark", "cifar10", "--format", "imagefolder"], "error: format: cifar10 cannot be read as 'imagefolder'"),
])
def test_user_errors_print_one_line_and_exit_2(collection, capsys, args, message):
    assert main(["eval", "--model", "tiny-vit", "--root", str(collection), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(root=collection)) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["eval", "probe"])
def test_a_root_that_is_not_a_folder_is_named(tmp_path, capsys, command):
    missing = tmp_path / "no-such-root"
    assert main([command, "--model", "tiny-vit", "--benchmark", "cifar10", "--root", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: --root: {missing} is not a folder\n"


def test_report_of_a_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.json: results file does not exist" in err
