"""The shard writer on small sources made here: every format, skip reasons, byte-identical re-runs, the CLI."""

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import FMNIST, REPO
from PIL import Image

from vlpretrain.cli import main as cli_main
from vlpretrain.data import write_shards
from vlpretrain.data.sources import detect_format, fill_template, load_classes
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import read_idx

FASHION_CLASSES = Path(__file__).resolve().parent.parent / "configs" / "captions" / "fashion_classes.txt"


def image(path: Path, color=(200, 30, 30), size=(40, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def read_shards(outdir: Path) -> list[dict]:
    """Every sample of the shards in outdir, in order: {ext: bytes}, with __key__ and __shard__."""
    samples = []
    for tar_path in sorted(outdir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__shard__": tar_path.name})
                samples[-1][ext] = tar.extractfile(m).read()
    return samples


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def digest(outdir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(outdir.glob("*.tar"))}


@pytest.fixture
def table_source(tmp_path):
    """captions.csv in Flickr8k's shape (several rows per image) plus bad rows of every kind."""
    imgs = tmp_path / "Images"
    image(imgs / "a.jpg", (255, 0, 0))
    image(imgs / "b.png", (0, 255, 0), fmt="PNG")
    image(imgs / "c.jpg", (0, 0, 255))
    (imgs / "broken.jpg").write_bytes(image(tmp_path / "x.jpg").read_bytes()[:200])  # truncated JPEG
    rows = [("a.jpg", "a red box"), ("b.png", "green"), ("a.jpg", "red again"), ("gone.jpg", "nothing"),
            ("c.jpg", "  "), ("broken.jpg", "cut short"), ("c.jpg", "blue"), ("a.jpg", "third red")]
    lines = ["image,caption"] + [f"{i},{c}" for i, c in rows]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_csv_groups_rows_per_image_and_reports_every_skipped_row(table_source, tmp_path):
    src = table_source / "captions.txt"
    assert detect_format(src) == "csv"  # Flickr8k's captions.txt is recognised by its header
    m = write_shards(src, tmp_path / "out", image_root=table_source / "Images", keep_order=True, progress=False)
    samples = read_shards(tmp_path / "out")
    assert [meta(s)["source"] for s in samples] == ["a.jpg", "b.png", "c.jpg"]
    assert meta(samples[0])["captions"] == ["a red box", "red again", "third red"]
    assert samples[0]["txt"] == b"a red box"
    assert meta(samples[2])["captions"] == ["blue"]  # its empty-caption row is reported, the image kept
    assert "png" in samples[1] and "jpg" in samples[0]  # encodings kept as they are
    assert (meta(samples[0])["width"], meta(samples[0])["height"]) == (40, 30)
    assert m["samples"] == 3
    assert m["skipped"]["by_reason"] == {"missing file": 1, "empty caption": 1, "undecodable image": 1}
    where = {r["reason"]: r["where"] for r in m["skipped"]["rows"]}
    assert where == {"missing file": "captions.txt:5", "empty caption": "captions.txt:6",
                     "undecodable image": "captions.txt:7"}


def test_one_sample_per_caption(table_source, tmp_path):
    m = write_shards(table_source / "captions.txt", tmp_path / "out", format="csv",
                     image_root=table_source / "Images", one_sample_per_caption=True, keep_order=True,
                     progress=False)
    samples = read_shards(tmp_path / "out")
    assert [s["txt"].decode() for s in samples] == ["a red box", "green", "red again", "blue", "third red"]
    assert m["samples"] == 5


def test_tsv_with_img2dataset_url_column_and_jsonl_caption_lists(tmp_path):
    image(tmp_path / "imgs" / "p.jpg")
    image(tmp_path / "imgs" / "q.webp", fmt="WEBP")
    (tmp_path / "pairs.tsv").write_text("url\tcaption\nimgs/p.jpg\tfirst\nimgs/q.webp\tsecond\n")
    write_shards(tmp_path / "pairs.tsv", tmp_path / "o1", keep_order=True, progress=False)
    assert [(s["txt"], "webp" in s) for s in read_shards(tmp_path / "o1")] == [(b"first", False), (b"second", True)]

    rows = [{"file": str(tmp_path / "imgs" / "p.jpg"), "text": ["one", "two"]},
            {"file": str(tmp_path / "imgs" / "q.webp"), "text": "three"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(tmp_path / "d.jsonl", tmp_path / "o2", image_column="file", caption_column="text", keep_order=True,
                 progress=False)
    assert [meta(s)["captions"] for s in read_shards(tmp_path / "o2")] == [["one", "two"], ["three"]]


def test_table_without_the_named_column_names_it(tmp_path):
    (tmp_path / "t.csv").write_text("path,text\na.jpg,x\n")
    with pytest.raises(DataError, match=r"t.csv: no column 'image'"):
        write_shards(tmp_path / "t.csv", tmp_path / "o", progress=False)


def test_coco_captions_with_its_image_folder(tmp_path):
    image(tmp_path / "train2017" / "000001.jpg")
    image(tmp_path / "train2017" / "000002.jpg")
    coco = {"images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"},
                       {"id": 3, "file_name": "000003.jpg"}],
            "annotations": [{"image_id": 2, "id": 10, "caption": "two a"}, {"image_id": 1, "id": 11, "caption": "one"},
                            {"image_id": 2, "id": 12, "caption": "two b"}]}
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(coco))
    assert detect_format(ann) == "coco"
    m = write_shards(ann, tmp_path / "out", keep_order=True, progress=False)
    assert [meta(s)["captions"] for s in read_shards(tmp_path / "out")] == [["one"], ["two a", "two b"]]
    assert m["skipped"]["rows"] == [{"where": "captions_train2017.json: image id 3", "reason": "empty caption",
                                     "detail": "no non-empty caption annotation"}]


def test_folder_with_sidecar_captions(tmp_path):
    src = tmp_path / "src"
    image(src / "x" / "1.jpg")
    (src / "x" / "1.txt").write_text("first picture\n")
    image(src / "2.png", fmt="PNG")
    (src / "2.txt").write_text("second")
    image(src / "3.jpg")  # no caption file
    assert detect_format(src) == "folder"
    m = write_shards(src, tmp_path / "out", keep_order=True, progress=False)
    assert [(meta(s)["source"], s["txt"]) for s in read_shards(tmp_path / "out")] == [
        ("2.png", b"second"), ("x/1.jpg", b"first picture")]
    assert m["skipped"]["by_reason"] == {"missing caption": 1}


def test_labelled_image_folder_with_templates(tmp_path):
    src = tmp_path / "src"
    for cls, color in (("ankle_boot", (0, 0, 0)), ("dress", (255, 255, 255))):
        for i in range(3):
            image(src / cls / f"{i}.jpg", color)
    tmpl = tmp_path / "t.txt"
    tmpl.write_text("# comment\na {c} on a table\n\nthe {c}\n")
    assert detect_format(src) == "labelled"
    write_shards(src, tmp_path / "out", templates=tmpl, keep_order=True, progress=False)
    samples = read_shards(tmp_path / "out")
    assert [(meta(s)["label"], meta(s)["class"]) for s in samples] == [(0, "ankle boot")] * 3 + [(1, "dress")] * 3
    allowed = {0: {"an ankle boot on a table", "the ankle boot"}, 1: {"a dress on a table", "the dress"}}
    assert all(s["txt"].decode() in allowed[meta(s)["label"]] for s in samples)


def test_labelled_template_choice_is_seeded(tmp_path):
    src = tmp_path / "src"
    for i in range(24):
        image(src / "coat" / f"{i:02d}.png", fmt="PNG")
    templates = [f"{{c}} number {k}" for k in range(8)]
    caps = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{seed}{len(caps)}"
        write_shards(src, out, templates=templates, seed=seed, progress=False)
        caps.setdefault(seed, []).append([s["txt"] for s in read_shards(out)])
    assert caps[0][0] == caps[0][1]
    assert caps[0][0] != caps[1][0]
    assert len(set(caps[0][0])) > 3  # the templates are actually varied


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_labelled_idx_files(tmp_path, layout):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 9, 1], dtype=np.uint8)
    if layout == "torchvision":
        root, raw, gz = tmp_path / "data", tmp_path / "data" / "FashionMNIST" / "raw", True
    else:
        root, raw, gz = tmp_path / "digits", tmp_path / "digits", False
    write_idx(raw / ("train-images-idx3-ubyte" + ".gz" * gz), imgs, gz)
    write_idx(raw / ("train-labels-idx1-ubyte" + ".gz" * gz), labels, gz)
    # class names come from --classes (here the demo's file); without it idx labels are named by their number
    fashion = FASHION_CLASSES if layout == "torchvision" else None
    write_shards(root, tmp_path / "out", templates=["{c}"], classes=fashion, keep_order=True, progress=False)
    samples = read_shards(tmp_path / "out")
    names = load_classes(FASHION_CLASSES) if layout == "torchvision" else [str(i) for i in range(10)]
    assert [s["txt"].decode() for s in samples] == [names[i] for i in labels]
    assert [meta(s)["label"] for s in samples] == labels.tolist()
    decoded = np.asarray(Image.open(io.BytesIO(samples[2]["png"])))
    assert decoded.shape == (28, 28) and (decoded == imgs[2]).all()  # raw arrays stored losslessly


@pytest.mark.skipif(not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_idx_reader_matches_torchvision_on_real_fashion_mnist():
    from torchvision.datasets.mnist import read_label_file

    ours = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    raw = gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fm-labels-{os.getpid()}"
    tmp.write_bytes(raw)
    try:
        assert (read_label_file(str(tmp)).numpy() == ours).all()
    finally:
        tmp.unlink()
    assert ours.shape == (10000,) and ours[0] == 9  # the first test image is an ankle boot


def test_fill_template_article():
    assert fill_template("a {c} laid flat", "ankle boot") == "an ankle boot laid flat"
    assert fill_template("A {c}", "ankle boot") == "An ankle boot"
    assert fill_template("a {c}", "shirt") == "a shirt"
    assert fill_template("what a {c}", "t-shirt") == "what a t-shirt"


def test_training_templates_are_not_the_evaluation_ones():
    path = REPO / "configs" / "captions" / "fashion_train.txt"
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert 20 <= len(lines) <= 40 and all("{c}" in line for line in lines)
    evaluation = {"a photo of a {c}.", "a photo of the {c}.", "a blurry photo of a {c}.", "a photo of a small {c}."}
    assert not evaluation & {line.strip() for line in lines}


@pytest.fixture
def many_images(tmp_path):
    src = tmp_path / "src"
    for i in range(23):
        image(src / f"{i:03d}.jpg", (i * 10 % 256, 50, 100), size=(30 + i, 20))
        (src / f"{i:03d}.txt").write_text(f"picture {i}")
    return src


def test_byte_identical_reruns_whatever_the_workers(many_images, tmp_path):
    a = write_shards(many_images, tmp_path / "a", shard_size=5, workers=1, progress=False)
    write_shards(many_images, tmp_path / "b", shard_size=5, workers=2, progress=False)
    write_shards(many_images, tmp_path / "c", shard_size=5, workers=2, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") == digest(tmp_path / "c")
    assert [s["samples"] for s in a["shards"]] == [5, 5, 5, 5, 3]
    assert [s["name"] for s in a["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left behind
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o444)


def test_shard_bytes_max_side_and_reencode(many_images, tmp_path):
    m = write_shards(many_images, tmp_path / "o", shard_bytes=6 * 1024, max_side=16, keep_order=True, progress=False)
    assert all(s["bytes"] <= 6 * 1024 + 10240 for s in m["shards"]) and len(m["shards"]) > 2
    samples = read_shards(tmp_path / "o")
    last = meta(samples[-1])
    assert (last["width"], last["height"]) == (16, round(20 * 16 / 52))  # 52x20 shrunk to a longer side of 16
    assert Image.open(io.BytesIO(samples[-1]["jpg"])).size == (16, 6)
    write_shards(many_images, tmp_path / "r", reencode=True, max_side=None, progress=False, prefix="re")
    assert all("jpg" in s for s in read_shards(tmp_path / "r"))


def test_skip_existing_leaves_intact_shards_alone(many_images, tmp_path):
    out = tmp_path / "o"
    write_shards(many_images, out, shard_size=10, progress=False)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    write_shards(many_images, out, shard_size=10, skip_existing=True, progress=False)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")} == before
    write_shards(many_images, out, shard_size=20, skip_existing=True, progress=False)  # other inputs: rewrite
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((out / "_manifest.json").read_text())["inputs"]["shard_size"] == 20


def test_user_errors(tmp_path, many_images):
    with pytest.raises(DataError, match="source does not exist"):
        write_shards(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="pass --format"):
        write_shards(tmp_path / "x.bin", tmp_path / "o")
    with pytest.raises(ConfigError, match="needs caption templates"):
        write_shards(many_images, tmp_path / "o", format="labelled")
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match=r"bad.txt:1: template has no \{c\}"):
        write_shards(many_images, tmp_path / "o", templates=tmp_path / "bad.txt")


def test_cli_make_shards(many_images, tmp_path, capsys):
    rc = cli_main(["make-shards", str(many_images), str(tmp_path / "o"), "--shard-size", "10", "--prefix", "pics",
                   "--no-progress"])
    assert rc == 0
    assert "23 samples in 3 shards; skipped 0" in capsys.readouterr().out
    assert cli_main(["make-shards", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "source does not exist" in capsys.readouterr().err


def class_folders(root: Path, classes: int, per_class: int) -> Path:
    """An ImageFolder sorted on disk: class k's images in folder kNN, drawn in a colour of their own."""
    for k in range(classes):
        for i in range(per_class):
            image(root / f"k{k:02d}" / f"{i:03d}.png", (25 * k, i % 256, 7), size=(6, 4), fmt="PNG")
    return root


def shard_classes(outdir: Path) -> dict[str, set[int]]:
    classes: dict[str, set[int]] = {}
    for s in read_shards(outdir):
        classes.setdefault(s["__shard__"], set()).add(meta(s)["label"])
    return classes


def test_class_sorted_folder_is_written_in_a_seeded_random_order(tmp_path):
    src = class_folders(tmp_path / "src", classes=10, per_class=30)
    shuffled = write_shards(src, tmp_path / "mixed", templates=["a photo of a {c}."], shard_size=60, progress=False)
    kept = write_shards(src, tmp_path / "kept", templates=["a photo of a {c}."], shard_size=60, keep_order=True,
                        progress=False)
    assert shuffled["order"] == {"shuffled": True, "seed": 0} and kept["order"] == {"shuffled": False}
    # source order puts two classes in each shard of 60 (30 per class); the shuffled order nearly all ten
    assert max(len(c) for c in shard_classes(tmp_path / "kept").values()) == 2
    assert min(len(c) for c in shard_classes(tmp_path / "mixed").values()) >= 9
    ids = {p: sorted(meta(s)["source"] for s in read_shards(tmp_path / p)) for p in ("mixed", "kept")}
    assert ids["mixed"] == ids["kept"] and len(set(ids["kept"])) == 300  # the same samples, each once
    assert [meta(s)["source"] for s in read_shards(tmp_path / "kept")] == ids["kept"]  # kept: source order


def test_write_order_is_seeded_and_byte_identical(many_images, tmp_path):
    a = write_shards(many_images, tmp_path / "a", shard_size=5, seed=3, progress=False)
    write_shards(many_images, tmp_path / "b", shard_size=5, seed=3, workers=2, progress=False)
    write_shards(many_images, tmp_path / "c", shard_size=5, seed=4, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    order = {d: [meta(s)["source"] for s in read_shards(tmp_path / d)] for d in "abc"}
    assert order["a"] != order["c"] and sorted(order["a"]) == sorted(order["c"])
    assert order["a"] != sorted(order["a"])
    assert a["order"] == {"shuffled": True, "seed": 3}
    assert json.loads((tmp_path / "c" / "_manifest.json").read_text())["order"] == {"shuffled": True, "seed": 4}


def test_cli_make_shards_keep_order(many_images, tmp_path):
    assert cli_main(["make-shards", str(many_images), str(tmp_path / "o"), "--keep-order", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert manifest["order"] == {"shuffled": False} and manifest["inputs"]["keep_order"] is True
    assert [meta(s)["source"] for s in read_shards(tmp_path / "o")] == [f"{i:03d}.jpg" for i in range(23)]
