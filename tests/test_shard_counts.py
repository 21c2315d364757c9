"""Foreign shards (img2dataset's, open_clip's, DataComp's layouts): counts from sidecars without a scan, gaps in the
numbering, sample keys, index-shards, cuts and disagreeing counts, and shards in object storage."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import REPO, free_port, subprocess_env
from PIL import Image

from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, count_shards, index_shards
from vlpretrain.data.tars import scan
from vlpretrain.errors import DataError

ENV = subprocess_env()


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, 0)).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(first: int, n: int, image: str = "jpg", text: str = "txt", end: bool = True) -> bytes:
    """A shard of `n` samples numbered from `first`: the image's red channel and the caption carry the number."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for i in range(first, first + n):
        for ext, data in ((image, png(i)), (text, str(i).encode()), ("json", json.dumps({"i": i}).encode())):
            info = tarfile.TarInfo(f"{i:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if end:
        tar.close()
        return buf.getvalue()
    tar.fileobj.flush()
    return buf.getvalue()  # no end-of-archive blocks: cut on a member boundary


def img2dataset_folder(root: Path, sizes: list[int], stats: bool = True, skip: tuple[int, ...] = ()) -> str:
    """img2dataset's layout: 00000.tar with 00000_stats.json; the shards in `skip` failed (gaps in numbering)."""
    root.mkdir(parents=True, exist_ok=True)
    first = 0
    for s, n in enumerate(sizes):
        if s not in skip:
            (root / f"{s:05d}.tar").write_bytes(tar_bytes(first, n))
            if stats:
                (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n,
                                                                      "failed_to_download": 1}))
        first += n
    return str(root / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def red_numbers(images: torch.Tensor) -> list[int]:
    return [int(round(float(x) * 255)) for x in images[:, 0, 0, 0]]


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, *img.size[::-1]) / 255


def tokens(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c)] for c in captions])


def read_all(cfg: DataConfig) -> tuple[list[int], list[int], dict]:
    loader = build_loader(cfg, to_tensor, tokens, rank=0, world_size=1)
    images, texts = [], []
    for x, t in loader:
        images += red_numbers(x)
        texts += t[:, 0].tolist()
    return images, texts, loader.metrics()


def test_sidecars_count_without_a_scan_in_their_order(tmp_path):
    stats = img2dataset_folder(tmp_path / "i2d", [5, 7, 3])
    c = count_shards([u for u in [stats.replace("{00000..00002}", f"{s:05d}") for s in range(3)]])
    assert c.samples == [5, 7, 3] and all(c.exact) and c.how == {"img2dataset stats": 3}

    oc = tmp_path / "oc"
    oc.mkdir()
    for s, n in enumerate([4, 6]):
        (oc / f"{s:05d}.tar").write_bytes(tar_bytes(100 * s, n))
    (oc / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 6}))
    (oc / "00000_stats.json").write_text(json.dumps({"successes": 999}))  # sizes.json comes first
    c = count_shards([str(oc / "00000.tar"), str(oc / "00001.tar")])
    assert c.samples == [4, 6] and c.how == {"sizes.json": 2}

    (oc / "sizes.json").unlink()
    (oc / "__len__").write_text("11")  # a total only: an even share per shard, not exact
    (oc / "00000_stats.json").unlink()
    c = count_shards([str(oc / "00000.tar"), str(oc / "00001.tar")])
    assert c.samples == [6, 5] and c.exact == [False, False] and c.how == {"__len__": 2}

    (oc / "__len__").unlink()
    c = count_shards([str(oc / "00000.tar"), str(oc / "00001.tar")], num_samples=20)
    assert c.samples == [10, 10] and c.how == {"data.train_num_samples": 2}
    c = count_shards([str(oc / "00000.tar"), str(oc / "00001.tar")])  # nothing says: one header scan
    assert c.samples == [4, 6] and c.exact == [True, True] and c.how == {"scan": 2}
    # resampled mode needs no counts and never scans
    c = count_shards([str(oc / "00000.tar"), str(oc / "00001.tar")], need_counts=False)
    assert c.exact == [False, False] and c.how == {}


def test_gaps_in_numbering_stop_or_are_skipped_and_counted(tmp_path):
    pattern = img2dataset_folder(tmp_path, [4, 4, 4, 4, 4], skip=(1, 3))
    cfg = DataConfig(train=pattern, batch_size=4, workers=0, shuffle_buffer=0, augment=False, interleave_shards=1)
    with pytest.raises(DataError, match=r"2 of 5 shards do not exist \(.*00001\.tar, .*00003\.tar\); set "
                                        r"data\.missing_shards: skip"):
        build_loader(cfg, to_tensor, tokens, rank=0, world_size=1)
    cfg.missing_shards = "skip"
    images, texts, metrics = read_all(cfg)
    assert sorted(images) == sorted(texts) == [*range(0, 4), *range(8, 12), *range(16, 20)]
    assert metrics["data/missing_shards"] == 2


def test_sample_keys_read_other_members_and_json_fields(tmp_path):
    (tmp_path / "a.tar").write_bytes(tar_bytes(0, 4, image="input.jpg", text="output.txt"))
    (tmp_path / "b.tar").write_bytes(tar_bytes(4, 4, image="webp", text="caption"))
    base = dict(batch_size=4, workers=0, shuffle_buffer=0, augment=False)
    # the defaults find neither member: every sample is skipped, and the budget stops the run
    with pytest.raises(DataError):
        read_all(DataConfig(train=str(tmp_path / "a.tar"), **base))
    images, texts, _ = read_all(DataConfig(train=str(tmp_path / "a.tar"), image_key="input.jpg",
                                           text_key="output.txt", **base))
    assert images == texts == [0, 1, 2, 3]
    images, texts, _ = read_all(DataConfig(train=str(tmp_path / "b.tar"), image_key="jpg;webp",
                                           text_key="json:i;txt", **base))
    assert images == texts == [4, 5, 6, 7]  # json field "i" (an int) is the caption


def test_cut_shards_count_every_lost_sample_with_a_sidecar_and_at_least_one_without(tmp_path):
    whole = tar_bytes(0, 10)
    cut = tar_bytes(0, 6, end=False)  # six whole samples, then nothing: a cut on a member boundary
    assert scan_bytes(tmp_path, whole) == (10, True) and scan_bytes(tmp_path, cut) == (6, False)
    (tmp_path / "00000.tar").write_bytes(cut)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 10}))
    cfg = DataConfig(train=str(tmp_path / "00000.tar"), batch_size=2, workers=0, shuffle_buffer=0, augment=False,
                     error_budget=1.0)
    images, _, metrics = read_all(cfg)
    # the plan holds 10 samples: the six that are left, then four again from a second pass (plan.py)
    assert images == [*range(6), *range(4)] and metrics["data/skipped/truncated tar"] == 4
    (tmp_path / "00000_stats.json").unlink()  # no sidecar: the scan sees the missing end, one loss counted
    cfg.shuffle_buffer = 100  # the buffer reads the shard to its end before the first batch
    _, _, metrics = read_all(cfg)
    assert metrics["data/skipped/truncated tar"] == 1


def scan_bytes(tmp_path: Path, data: bytes) -> tuple[int, bool]:
    path = tmp_path / "probe.tar"
    path.write_bytes(data)
    try:
        return scan(str(path))
    finally:
        path.unlink()


def test_manifest_that_is_corrupt_or_disagrees_is_an_error_naming_it(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(0, 6))
    cfg = DataConfig(train=str(tmp_path / "00000.tar"), batch_size=2, workers=0, shuffle_buffer=0, augment=False)
    manifest = tmp_path / "_manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(DataError, match=r"_manifest\.json: unreadable shard manifest"):
        read_all(cfg)
    size = (tmp_path / "00000.tar").stat().st_size
    for listed in (4, 8):  # lower and higher than the shard, which is whole
        manifest.write_text(json.dumps({"shards": [{"name": "00000.tar", "samples": listed, "bytes": size}]}))
        holds = "more than 4" if listed == 4 else "6"  # noticed as soon as the shard outgrows its count
        with pytest.raises(DataError, match=rf"00000\.tar: holds {holds} samples, but its sidecar count .* says {listed}"):
            read_all(cfg)


def test_index_shards_writes_a_manifest_beside_or_elsewhere(tmp_path):
    shards = tmp_path / "shards"
    img2dataset_folder(shards, [5, 3, 4], stats=False)
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "index-shards", str(shards), "--workers", "2"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 shards, 12 samples" in r.stdout
    manifest = json.loads((shards / "_manifest.json").read_text())
    assert [(s["name"], s["samples"], s["complete"]) for s in manifest["shards"]] == [
        ("00000.tar", 5, True), ("00001.tar", 3, True), ("00002.tar", 4, True)]
    c = count_shards([str(shards / f"{s:05d}.tar") for s in range(3)])
    assert c.samples == [5, 3, 4] and c.how == {"manifest": 3}
    # an unlisted shard is refused, as for make-shards' own
    (shards / "00003.tar").write_bytes(tar_bytes(50, 2))
    with pytest.raises(DataError, match=r"00003\.tar: not listed in"):
        count_shards([str(shards / f"{s:05d}.tar") for s in range(4)])
    (shards / "00003.tar").unlink()

    # a read-only folder: the index goes elsewhere and data.index names it
    (shards / "_manifest.json").unlink()
    elsewhere = tmp_path / "index"
    path, counts = index_shards(str(shards / "{00000..00002}.tar"), workers=1, out=str(elsewhere))
    assert path == str(elsewhere / "_manifest.json") and counts.samples == [5, 3, 4]
    cfg = DataConfig(train=str(shards / "{00000..00002}.tar"), index=str(elsewhere), batch_size=4, workers=0,
                     shuffle_buffer=0, augment=False, interleave_shards=1)
    loader = build_loader(cfg, to_tensor, tokens, rank=0, world_size=1)
    assert loader.shard_counts.how == {"index": 3} and loader.batches_per_epoch == 3
    if os.getuid() != 0:  # root writes anywhere
        shards.chmod(0o555)
        with pytest.raises(DataError, match=r"cannot write here .* --out DIR"):
            index_shards(str(shards), workers=1)


def test_shards_in_object_storage_read_like_local_ones(tmp_path, s3_server):
    local = tmp_path / "local"
    pattern = img2dataset_folder(local, [4, 6, 2, 4], skip=(2,))
    bucket = s3_server.bucket()
    fs = fsspec.filesystem("s3")
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{bucket}/laion/{f.name}")
    remote = f"s3://{bucket}/laion/{{00000..00003}}.tar"
    base = dict(batch_size=2, workers=1, shuffle_buffer=0, augment=False, missing_shards="skip")
    got = {}
    for name, train in (("local", pattern), ("s3", remote)):
        loader = build_loader(DataConfig(train=train, **base), to_tensor, tokens, rank=0, world_size=1)
        assert loader.shard_counts.how == {"img2dataset stats": 3}
        assert [u.rsplit("/", 1)[1] for u in loader.shard_counts.missing] == ["00002.tar"]
        got[name] = [red_numbers(x) for x, _ in loader]
    assert got["s3"] == got["local"] and sorted(sum(got["s3"], [])) == [*range(10), *range(12, 16)]
    # resampled mode from object storage (and a glob over it)
    cfg = DataConfig(train=f"s3://{bucket}/laion/*.tar", mode="resampled", train_num_samples=12, **base)
    loader = build_loader(cfg, to_tensor, tokens, rank=0, world_size=1)
    drawn = sum((red_numbers(x) for x, _ in loader), [])
    assert len(drawn) == 12 and set(drawn) <= {*range(10), *range(12, 16)}



@pytest.mark.slow
def test_two_ranks_count_once_and_a_resume_counts_nothing(tmp_path):
    # foreign shards with no sidecar at all: the expensive case, a header scan
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(4):
        (shards / f"{s:05d}.tar").write_bytes(tar_bytes(10 * s, 8))
    out = tmp_path / "run"
    env = ENV

    def train(*extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            f"--master_port={free_port()}", "-m", "vlpretrain.cli", "train",
                            "--config", str(REPO / "configs" / "demo.yaml"),
                            "--set", f"data.train={shards}/{{00000..00003}}.tar", "--set", "data.batch_size=4",
                            "--set", "data.workers=1", "--set", f"train.output_dir={out}", "--set", "eval.benchmarks=[]",
                            "--set", "train.warmup_steps=1", "--set", "train.progress=false", *extra],
                           env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr

    first = train("--set", "train.steps=2")
    assert first.count("by scanning their headers") == 1  # rank 0 alone, not once per rank
    assert first.count("data: 4 shards, 32 samples (4 from scan)") == 1 and "(counted)" in first
    kept = json.loads((out / "shard_counts.json").read_text())
    assert kept["counts"]["samples"] == [8, 8, 8, 8]
    again = train("--set", "train.steps=3", "--resume", "latest")
    assert "by scanning their headers" not in again
    assert again.count("data: 4 shards, 32 samples (4 from scan)") == 1 and "(kept in" in again


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_walk_reads_names_as_tarfile_does_in_every_format(tmp_path, fmt):
    from vlpretrain.data.tars import _local_names

    path = tmp_path / "s.tar"
    deep = "d" * (120 if fmt != tarfile.USTAR_FORMAT else 60)  # past 100 bytes: GNU long names, pax paths
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(20):
            for ext in ("jpg", "txt"):
                data = b"x" * (i * 37)
                info = tarfile.TarInfo(f"{deep}/ü{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        assert _local_names(str(path)) == ([m.name for m in tar if m.isreg()], True)
    assert scan(str(path)) == (20, True)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    n, clean = scan(str(path))
    assert 0 < n < 20 and not clean
