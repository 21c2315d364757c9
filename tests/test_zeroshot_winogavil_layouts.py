"""WinoGAViL read as DataComp reads it (nlphuji/winogavil's parquet files or a save_to_disk folder, the "hf" layout)
and from our webdataset layout: DataComp's wino_eval.py metric formula re-computed by hand on the same similarities,
the same metrics from every layout, images decoded one at a time, and one-line errors naming file and row."""

import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    PRIMARIES,
    ColourClip,
    winogavil_table,
    write_winogavil,
    write_winogavil_parquet,
    write_winogavil_saved,
)
from PIL import Image
from sklearn.metrics import jaccard_score
from torchvision.transforms import functional as TF

import zeroshot
from vlpretrain.errors import ConfigError, DataError
from zeroshot.cli import main
from zeroshot.datasets import get_benchmark


def instances(seed: int = 0) -> list[tuple[str, list[str], list[str], list[Image.Image]]]:
    """Ten cues (red, green or blue, in mixed case) over 5, 6, 10 or 12 candidates of random solid colours, 1-4
    of them the true associations."""
    rng = np.random.default_rng(seed)
    out = []
    for n, size in enumerate([5, 6, 10, 12, 12, 10, 5, 6, 10, 12]):
        cue = ["red", "Green", "BLUE"][n % 3]
        names = [f"w{n}c{i}" for i in range(size)]
        chosen = rng.choice(size, size=int(rng.integers(1, 5)), replace=False)
        images = [Image.new("RGB", (8, 8), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(size)]
        out.append((cue, names, [names[i] for i in sorted(chosen)], images))
    return out


def datacomp_by_hand(data) -> dict[str, float]:
    """DataComp's wino_eval.py arithmetic: cosine of each candidate image with the cue's prompt ("A <cue>", which
    ColourClip embeds as the cue colour's unit vector; images embed as their mean RGB in [0, 1]), the top
    k = len(associations) candidates by numpy argsort()[-k:], sklearn's jaccard_score per cue, means by size."""
    by_size: dict[int, list[float]] = {5: [], 6: [], 10: [], 12: []}
    for cue, names, associations, images in data:
        rgb = np.array([im.getpixel((0, 0)) for im in images], dtype=np.float64) / 255
        sims = rgb[:, list(PRIMARIES).index(cue.lower())] / np.linalg.norm(rgb, axis=1)
        top = np.argsort(sims)[-len(associations):]
        truth = np.array([n in associations for n in names])
        by_size[len(names)].append(jaccard_score(truth, np.isin(np.arange(len(names)), top)))
    return {"jaccard_score_5": np.mean(by_size[5]), "jaccard_score_6": np.mean(by_size[6]),
            "jaccard_score_10": np.mean(by_size[10]), "jaccard_score_12": np.mean(by_size[12]),
            "jaccard_score_5-6": np.mean(by_size[5] + by_size[6]),
            "jaccard_score_10-12": np.mean(by_size[10] + by_size[12]),
            "avg_jaccard_score": np.mean(sum(by_size.values(), []))}


def evaluate(root, format=None, **options) -> dict[str, float]:
    model = ColourClip("A {}")
    return zeroshot.evaluate(model, "winogavil", root, tokenizer=model.tokenizer, transform=TF.to_tensor,
                             format=format, progress=False, batch_size=7, **options)


def test_parquet_and_save_to_disk_equal_datacomp_by_hand_and_the_wds_layout(tmp_path):
    data = instances()
    write_winogavil_parquet(tmp_path / "parquet", data, files=2, row_group_size=2)
    write_winogavil_saved(tmp_path / "saved", data, files=2)
    write_winogavil(tmp_path / "wds", data)
    want = datacomp_by_hand(data)
    got = {name: evaluate(tmp_path / name) for name in ("parquet", "saved", "wds")}
    for metrics in got.values():
        assert {k: metrics[k] for k in want} == pytest.approx(want, abs=1e-12)
        assert metrics["headline"] == metrics["jaccard_score_10-12"] and metrics["instances"] == 10
        assert metrics["images"] == sum(len(names) for _, names, _, _ in data)
    assert got["parquet"] == got["saved"] == got["wds"]  # the same images, so the very same similarities
    # max_images keeps an evenly spaced subset of the cues, the same ones from every layout
    assert evaluate(tmp_path / "parquet", max_images=5) == evaluate(tmp_path / "wds", max_images=5)


def test_layout_detected_beside_wds_and_forced_by_format(tmp_path):
    data = instances()[:4]
    bench = get_benchmark("winogavil")
    write_winogavil(tmp_path / "wds_winogavil_test", data)
    assert bench.locate(tmp_path)[1].name == "wds"
    write_winogavil_saved(tmp_path / "wds_winogavil_test", data, files=1)  # both in DataComp's folder: hf first
    assert bench.locate(tmp_path)[1].name == "hf" and bench.formats == ("hf", "wds")
    assert bench.locate(tmp_path, format="wds")[1].name == "wds"
    assert evaluate(tmp_path, format="wds") == evaluate(tmp_path, format="hf")
    with pytest.raises(ConfigError, match=r"cannot be read as 'parquet' \(formats: hf, wds\)"):
        bench.locate(tmp_path, format="parquet")
    # the hub's parquet conversion (default/test/0000.parquet); one Dataset saved alone, its split in state.json
    write_winogavil_parquet(tmp_path / "conv", data, files=1)
    (tmp_path / "conv" / "data").rename(tmp_path / "conv" / "default")
    (tmp_path / "conv" / "default" / "test").mkdir()
    (tmp_path / "conv" / "default" / "test-00000-of-00001.parquet").rename(tmp_path / "conv/default/test/0000.parquet")
    write_winogavil_saved(tmp_path / "alone", data, files=1)
    for f in (tmp_path / "alone" / "test").iterdir():
        f.rename(tmp_path / "alone" / f.name)
    for root in (tmp_path / "conv", tmp_path / "alone"):
        assert evaluate(root) == evaluate(tmp_path, format="wds")
    with pytest.raises(DataError, match="no winogavil train data found"):
        bench.locate(tmp_path / "alone", split="train")


def test_images_are_decoded_one_at_a_time(tmp_path):
    rng = np.random.default_rng(1)
    noise = [(f"c{n}", [f"{n}.{i}" for i in range(6)], [f"{n}.0"],
              [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]) for n in range(32)]
    write_winogavil_parquet(tmp_path / "parquet", noise, files=1, row_group_size=2)
    write_winogavil_saved(tmp_path / "saved", noise, files=1)
    stored = 32 * 6 * 40 * 40 * 3  # noise does not compress: the PNGs hold about this much
    bench = get_benchmark("winogavil")
    for root in (tmp_path / "parquet", tmp_path / "saved"):
        before = pa.total_allocated_bytes()
        data = bench.load(root)
        assert pa.total_allocated_bytes() - before < stored / 10  # no image bytes read yet
        assert data.cues == [c for c, *_ in noise] and [t.tolist() for t in data.truths] == [[True] + [False] * 5] * 32
        # a parquet file is read a row group (2 cues, 12 images) at a time; the .arrow file is memory-mapped
        assert np.array_equal(np.asarray(data.images[13][0]), np.asarray(noise[2][3][1]))
        assert pa.total_allocated_bytes() - before < stored / 3
        # what DataLoader workers get: the file paths and rows, opened again in the worker
        copy = pickle.loads(pickle.dumps(data.images))
        assert len(pickle.dumps(data.images)) < stored / 10
        for i in (0, 191, 20):
            image, owner = copy[i]
            assert owner == i // 6 and np.array_equal(np.asarray(image), np.asarray(noise[i // 6][3][i % 6]))


def test_broken_files_are_one_line_errors_naming_file_and_row(tmp_path, capsys):
    data = instances()[:3]
    root = write_winogavil_parquet(tmp_path / "winogavil", data, files=1, drop=("cue",))
    file = root / "data" / "test-00000-of-00001.parquet"
    assert main(["eval", "--model", "tiny-vit", "--benchmark", "winogavil", "--root", str(tmp_path),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {file}: no column 'cue' (WinoGAViL needs cue, candidates, "
                                       "associations, candidate_images; the file has candidates, associations, "
                                       "candidate_images)\n")
    broken = [data[0], (data[1][0], data[1][1], data[1][2], [b"not an image"] + data[1][3][1:])]
    saved = write_winogavil_saved(tmp_path / "saved", broken, files=1) / "test" / "data-00000-of-00001.arrow"
    with pytest.raises(DataError) as e:
        evaluate(tmp_path / "saved")
    assert str(e.value).startswith(f"{saved}: row 1: candidate_images[0]: cannot decode the image (")
    assert "\n" not in str(e.value)
    short = [data[0], (*data[1][:3], data[1][3][:-1])]
    write_winogavil_saved(tmp_path / "short", short, files=1)
    with pytest.raises(DataError, match=r"data-00000-of-00001.arrow: row 1: 5 candidate_images for 6 "
                                                 "candidates$"):
        get_benchmark("winogavil").load(tmp_path / "short")
    # image paths where the Image values should be (an early loading script's column of file names)
    paths = pa.array([[f"{n}.jpg" for n in names] for _, names, _, _ in data], pa.list_(pa.string()))
    (tmp_path / "paths" / "test").mkdir(parents=True)
    pq.write_table(winogavil_table(data).set_column(3, "candidate_images", paths), tmp_path / "paths/test/0.parquet")
    with pytest.raises(DataError, match=r"paths/test/0.parquet: column 'candidate_images' is list<element: string>, "
                                        r"expected a list of images \(struct<bytes: binary, path: string>\)$"):
        get_benchmark("winogavil").load(tmp_path / "paths")
    assert torch.equal(get_benchmark("winogavil").load(tmp_path / "saved").truths[0], torch.tensor(
        [n in data[0][2] for n in data[0][1]]))


def test_without_pyarrow_the_hf_layout_says_what_to_install(tmp_path, monkeypatch):
    write_winogavil_saved(tmp_path, instances()[:1], files=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(ConfigError, match=r"^reading Hugging Face parquet or .arrow files needs pyarrow: "
                                          r"pip install 'vlpretrain\[datacomp\]'$"):
        get_benchmark("winogavil").load(tmp_path)
