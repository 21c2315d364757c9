"""The streaming loader on shards made here: exact epochs over ranks x workers, resampling, resume, bad data."""

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.config import DataConfig
from vlpretrain.data import build_loader, write_shards
from vlpretrain.data.plan import plan_epoch, round_robin_take
from vlpretrain.data.stages import decode
from vlpretrain.data.stats import WorkerStats
from vlpretrain.errors import ConfigError, DataError


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()


def noisy(img: Image.Image) -> torch.Tensor:
    """A stand-in for random augmentation: it draws from torch's RNG."""
    return to_tensor(img) + torch.rand(1)


def number_tokenizer(captions: list[str]) -> torch.Tensor:
    """'sample 17' -> [[17]]: lets a test read back which caption went with which image."""
    return torch.tensor([[int(c.rsplit(" ", 1)[1])] for c in captions])


def sample_ids(images: torch.Tensor) -> list[int]:
    """The index drawn into each image's pixels by `make_source`."""
    return [int(x[0, 0, 0]) + 256 * int(x[1, 0, 0]) for x in images]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (i % 256, i // 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def make_source(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:04d}.png").write_bytes(png(i))
        (root / f"{i:04d}.txt").write_text(f"sample {i}")
    return root


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def good(i: int) -> dict[str, bytes]:
    return {"__key__": f"{i:04d}", "png": png(i), "txt": f"sample {i}".encode()}


def make_shards(tmp: Path, sizes: list[int], name: str = "s", first: int = 0) -> str:
    """Shards (no manifest: counted by header scan) of consecutive ids from `first`; returns a brace pattern."""
    for k, size in enumerate(sizes):
        start = first + sum(sizes[:k])
        write_tar(tmp / f"{name}-{k:06d}.tar", [good(i) for i in range(start, start + size)])
    return str(tmp / f"{name}-{{000000..{len(sizes) - 1:06d}}}.tar")


def run(cfg: DataConfig, rank=0, world=1, epoch=0, start=0, transform=to_tensor, tokenizer=number_tokenizer):
    loader = build_loader(cfg, transform, tokenizer, rank=rank, world_size=world, epoch=epoch, start_batch=start)
    batches = list(loader)
    assert len(batches) == len(loader)
    return loader, batches


def ids(batches) -> list[list[int]]:
    out = []
    for images, tokens in batches:
        got = sample_ids(images)
        assert got == tokens[:, 0].tolist()  # every image travels with its own caption
        out.append(got)
    return out


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    """8 shards x 6 samples, written by make-shards (so with a manifest)."""
    tmp = tmp_path_factory.mktemp("even")
    src = make_source(tmp / "src", 48)
    write_shards(src, tmp / "out", prefix="even", shard_size=6, progress=False)
    return str(tmp / "out" / "even-{000000..000007}.tar")


def test_round_robin_take_by_hand():
    assert round_robin_take([3, 1, 2], 0) == [0, 0, 0]
    assert round_robin_take([3, 1, 2], 4) == [2, 1, 1]  # w0 w1 w2 w0
    assert round_robin_take([3, 1, 2], 5) == [2, 1, 2]  # ... w2
    assert round_robin_take([3, 1, 2], 6) == [3, 1, 2]


def test_plan_gives_every_rank_the_same_number_of_batches():
    counts = [7, 5, 6, 6, 6, 3, 6, 6, 2]
    plans = [plan_epoch(counts, seed=1, epoch=e, rank=r, world_size=3, workers=1, batch_size=4)
             for e in range(3) for r in range(3)]
    for e in range(3):
        assert len({p.batches for p in plans[3 * e: 3 * e + 3]}) == 1
    shards = [s for p in plans[:3] for s in p.workers[0].shards]
    assert sorted(shards) == list(range(9))  # every shard dealt to exactly one rank


@pytest.mark.slow
@pytest.mark.parametrize("interleave", [1, 4])
def test_exact_epoch_two_ranks_two_workers_visit_every_sample_once(even_shards, interleave):
    cfg = DataConfig(train=even_shards, batch_size=3, workers=2, shuffle_buffer=4, seed=3, interleave_shards=interleave)
    seen = []
    for rank in range(2):
        loader, batches = run(cfg, rank=rank, world=2)
        assert loader.batches_per_epoch == 8 and all(b[0].shape == (3, 3, 6, 8) for b in batches)
        seen += [i for b in ids(batches) for i in b]
    assert sorted(seen) == list(range(48))
    assert loader.stats.samples == 24 and loader.stats.bad == 0


def test_epoch_order_is_deterministic_and_changes_with_the_epoch(even_shards):
    cfg = DataConfig(train=even_shards, batch_size=4, workers=0, shuffle_buffer=10, seed=0)
    first = ids(run(cfg)[1])
    assert ids(run(cfg)[1]) == first
    second = ids(run(cfg, epoch=1)[1])
    assert second != first and sorted(sum(second, [])) == sorted(sum(first, [])) == list(range(48))


def test_uneven_shards_still_give_equal_batches_and_no_repeat(tmp_path):
    pattern = make_shards(tmp_path, [5, 7, 4, 6, 3])
    cfg = DataConfig(train=pattern, batch_size=2, workers=0, shuffle_buffer=3)
    for epoch in range(3):
        per_rank = [run(cfg, rank=r, world=2, epoch=epoch)[1] for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        seen = [i for batches in per_rank for b in ids(batches) for i in b]
        assert len(seen) == len(set(seen))


def test_too_few_shards_says_how_many_are_needed(tmp_path):
    pattern = make_shards(tmp_path, [4, 4, 4])
    cfg = DataConfig(train=pattern, batch_size=2, workers=2)
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\); epoch mode needs at least 4"):
        build_loader(cfg, to_tensor, number_tokenizer, rank=0, world_size=2)
    resampled = DataConfig(train=pattern, batch_size=2, workers=2, mode="resampled", train_num_samples=16)
    _, batches = run(resampled, rank=1, world=2)  # resampling needs no minimum
    assert len(batches) == 4


def test_resampled_epochs_differ_and_identical_seeds_repeat(even_shards):
    cfg = DataConfig(train=even_shards, batch_size=4, workers=0, mode="resampled", train_num_samples=40,
                     shuffle_buffer=8, seed=5)
    e0 = ids(run(cfg, world=2)[1])
    assert len(e0) == 5  # 40 samples over 2 ranks of 4
    assert ids(run(cfg, world=2)[1]) == e0
    assert ids(run(cfg, world=2, epoch=1)[1]) != e0
    other = DataConfig(**{**cfg.__dict__, "seed": 6})
    assert ids(run(other, world=2)[1]) != e0


def test_weighted_mixture(tmp_path):
    a = make_shards(tmp_path, [6, 6], name="a")
    b = make_shards(tmp_path, [6, 6], name="b", first=100)
    for weights, expect in (([1.0, 0.0], {"a"}), ([0.0, 2.0], {"b"}), ([1.0, 1.0], {"a", "b"})):
        cfg = DataConfig(train=[a, b], weights=weights, mode="resampled", train_num_samples=40, batch_size=4,
                         workers=0, shuffle_buffer=4)
        _, batches = run(cfg)
        assert len(batches) == 10
        assert {"b" if i >= 100 else "a" for b in ids(batches) for i in b} == expect
    with pytest.raises(ConfigError, match="one per data.train entry"):
        build_loader(DataConfig(train=[a, b], weights=[1.0], mode="resampled", train_num_samples=8),
                     to_tensor, number_tokenizer, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="resampled only"):
        build_loader(DataConfig(train=[a, b], weights=[1.0, 1.0]), to_tensor, number_tokenizer, rank=0,
                     world_size=1)


@pytest.mark.parametrize("interleave", [1, 3])
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_start_batch_resume_equals_the_continuation(tmp_path, workers, interleave):
    pattern = make_shards(tmp_path, [7, 5, 9, 6])  # workers with unequal batch counts
    cfg = DataConfig(train=pattern, batch_size=2, workers=workers, shuffle_buffer=5, seed=2,
                     interleave_shards=interleave)
    _, full = run(cfg, epoch=1, transform=noisy)
    for start in (1, 3, 4, len(full) - 1):
        _, resumed = run(cfg, epoch=1, start=start, transform=noisy)
        assert len(resumed) == len(full) - start
        for (xa, ta), (xb, tb) in zip(full[start:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_resampled_resume_equals_the_continuation(even_shards):
    cfg = DataConfig(train=even_shards, batch_size=3, workers=0, mode="resampled", train_num_samples=30)
    _, full = run(cfg, epoch=2, transform=noisy)
    _, resumed = run(cfg, epoch=2, start=4, transform=noisy)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[4:], resumed)) and len(resumed) == len(full) - 4


def test_main_process_rng_is_left_alone(even_shards):
    cfg = DataConfig(train=even_shards, batch_size=4, workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(cfg, transform=noisy)
    assert torch.equal(torch.rand(3), expected)


def test_several_captions_one_picked_per_epoch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(8):
        (src / f"{i}.png").write_bytes(png(i))
        rows += [f"{i}.png,sample {100 * k + i}" for k in range(5)]
    (src / "c.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    write_shards(src / "c.csv", tmp_path / "o", shard_size=8, progress=False)
    cfg = DataConfig(train=str(tmp_path / "o" / "shard-000000.tar"), batch_size=8, workers=0)
    picks = []
    for epoch in range(3):
        images, tokens = run(cfg, epoch=epoch)[1][0]
        order = sample_ids(images)
        picks.append({i: int(t) for i, t in zip(order, tokens[:, 0])})
        assert all(t % 100 == i for i, t in picks[-1].items())  # always one of the sample's own captions
    assert picks[0] != picks[1] or picks[1] != picks[2]
    assert run(cfg, epoch=1)[1][0][1].sort(0).values.tolist() == sorted([[t] for t in picks[1].values()])


@pytest.fixture
def bad_shards(tmp_path):
    """4 shards of 6: one cut inside its 4th sample, one with a corrupt image, an empty and a missing caption."""
    paths = [tmp_path / f"bad-{k:06d}.tar" for k in range(4)]
    for k, p in enumerate(paths):
        write_tar(p, [good(6 * k + j) for j in range(6)])
    samples = [good(6 + j) for j in range(6)]
    samples[1]["png"] = b"\x89PNG\r\n\x1a\n garbage"
    samples[2]["txt"] = b"   "
    del samples[3]["txt"]
    write_tar(paths[1], samples)
    with tarfile.open(paths[2]) as tar:
        cut = tar.getmember("0015.png").offset_data + 10  # 3 whole samples, then a cut image
    paths[2].write_bytes(paths[2].read_bytes()[:cut])
    return str(tmp_path / "bad-{000000..000003}.tar")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_bad_data_is_skipped_counted_and_logged_once(bad_shards, workers, caplog):
    cfg = DataConfig(train=bad_shards, batch_size=2, workers=workers, error_budget=0.5)
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.loader"):
        loader, batches = run(cfg)
    # the header scan saw 4 samples in the cut shard and 3 were read whole: 1 counted lost
    assert dict(loader.stats.skipped) == {"truncated tar": 1, "undecodable image": 1, "empty caption": 1,
                                          "missing caption": 1}
    assert loader.stats.by_shard[bad_shards.replace("{000000..000003}", "000001")] == Counter(
        {"undecodable image": 1, "empty caption": 1, "missing caption": 1})
    # planned from the counts 6+6+4+6 = 11 batches; the 18 good samples are all seen, and the shortfall of 4 is
    # filled by a second pass over the short worker's shards so that every rank still has 11 batches
    seen = [i for b in ids(batches) for i in b]
    assert len(batches) == 11 and loader.stats.samples == 22
    assert set(seen) == set(range(24)) - {7, 8, 9, 15, 16, 17} and len(seen) - len(set(seen)) == 4
    logged = [r.getMessage() for r in caplog.records if "skipping samples" in r.getMessage()]
    assert len(logged) == 4 and len({m.split(" (")[0] for m in logged}) == 4


def test_error_budget_names_the_worst_shard(bad_shards):
    cfg = DataConfig(train=bad_shards, batch_size=2, workers=0, error_budget=0.1)
    with pytest.raises(DataError, match=r"over data.error_budget 10.0%; worst shard .*bad-000001.tar "
                                        r"\(empty caption: 1, missing caption: 1, undecodable image: 1\)"):
        run(cfg)


def test_all_bad_worker_stops_with_a_data_error(tmp_path):
    path = tmp_path / "b-000000.tar"
    write_tar(path, [{"__key__": f"{i}", "png": b"junk", "txt": b"sample 1"} for i in range(4)])
    cfg = DataConfig(train=str(path), batch_size=2, workers=0, error_budget=1.0)
    with pytest.raises(DataError, match="no usable sample in its shards"):
        run(cfg)


def test_open_clip_tokenizer_and_transform(even_shards):
    import open_clip

    transform = open_clip.image_transform(32, is_train=True, aug_cfg={"scale": (0.9, 1.0)})
    cfg = DataConfig(train=even_shards, batch_size=4, workers=0)
    loader = build_loader(cfg, transform, open_clip.get_tokenizer("RN50"), rank=0, world_size=1)
    images, tokens = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (4, 77) and tokens.dtype == torch.int64
    assert loader.draft_size == 34  # 32 px / sqrt(0.9): enough pixels for the random crop


def test_forever_crosses_epochs_and_resumes(even_shards):
    cfg = DataConfig(train=even_shards, batch_size=8, workers=0)
    loader = build_loader(cfg, noisy, number_tokenizer, rank=0, world_size=1)
    stream = loader.forever()
    first = [next(stream) for _ in range(9)]  # 6 batches per epoch
    assert [(e, i) for e, i, _, _ in first] == [(0, i) for i in range(6)] + [(1, 0), (1, 1), (1, 2)]
    again = build_loader(cfg, noisy, number_tokenizer, rank=0, world_size=1).forever(0, 5)
    for (e, i, x, t), (e2, i2, x2, t2) in zip(first[5:], again):
        assert (e, i) == (e2, i2) and torch.equal(x, x2) and torch.equal(t, t2)


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(DataError, match=r"2 of 2 shards do not exist \(.*nope-000000\.tar, .*nope-000001\.tar\)"):
        build_loader(DataConfig(train=str(tmp_path / "nope-{000000..000001}.tar"), mode="resampled",
                                train_num_samples=10), to_tensor, number_tokenizer, rank=0, world_size=1)


def test_large_jpeg_is_draft_decoded():
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 30)).save(buf, format="JPEG")
    sample = {"__key__": "k", "__url__": "u", "ext": "jpg", "bytes": buf.getvalue()}
    (out,) = decode([dict(sample)], WorkerStats(), draft=64)
    assert out["image"].size == (100, 75)  # 1/4 scale: the smallest one still >= 64 px on both sides
    (full,) = decode([dict(sample)], WorkerStats(), draft=None)
    assert full["image"].size == (400, 300) and full["image"].mode == "RGB"


def test_shuffle_buffer_mixes_within_a_worker(tmp_path):
    pattern = make_shards(tmp_path, [8])
    in_order = ids(run(DataConfig(train=pattern, batch_size=8, workers=0, shuffle_buffer=0))[1])
    assert in_order == [list(range(8))]
    mixed = ids(run(DataConfig(train=pattern, batch_size=8, workers=0, shuffle_buffer=4))[1])
    assert mixed != in_order and sorted(mixed[0]) == list(range(8))


def test_shard_gone_after_start_is_counted_unreadable(tmp_path):
    pattern = make_shards(tmp_path, [6, 6, 6])
    cfg = DataConfig(train=pattern, batch_size=3, workers=0, error_budget=1.0)
    loader = build_loader(cfg, to_tensor, number_tokenizer, rank=0, world_size=1)
    (tmp_path / "s-000001.tar").unlink()
    batches = list(loader)
    assert dict(loader.stats.skipped) == {"unreadable shard": 6}
    assert len(batches) == 6 and set(i for b in ids(batches) for i in b) == set(range(18)) - set(range(6, 12))


def test_interleaving_mixes_shards_keeps_their_order_and_is_seeded(tmp_path):
    pattern = make_shards(tmp_path, [8, 8, 8, 8])  # shard k holds ids 8k .. 8k+7
    base = dict(train=pattern, batch_size=8, workers=0, shuffle_buffer=0)
    one_by_one = ids(run(DataConfig(**base, interleave_shards=1))[1])
    assert all(len({i // 8 for i in b}) == 1 for b in one_by_one)  # today's behaviour: a batch is one shard
    mixed = ids(run(DataConfig(**base, interleave_shards=4))[1])
    assert len({i // 8 for i in mixed[0]}) >= 3
    stream = [i for b in mixed for i in b]
    assert sorted(stream) == list(range(32))  # every sample exactly once
    for k in range(4):
        assert [i for i in stream if i // 8 == k] == list(range(8 * k, 8 * k + 8))  # each shard read in its order
    assert ids(run(DataConfig(**base, interleave_shards=4))[1]) == mixed
    assert ids(run(DataConfig(**base, interleave_shards=4, seed=1))[1]) != mixed
    assert ids(run(DataConfig(**base, interleave_shards=4), epoch=1)[1]) != mixed
    with pytest.raises(ConfigError, match="data.interleave_shards: must be >= 1"):
        run(DataConfig(**base, interleave_shards=0))


def class_tokenizer(captions: list[str]) -> torch.Tensor:
    """'a photo of a k03.' -> [[3]]: the class of each sample, read back from its caption."""
    return torch.tensor([[int(c.rsplit(" ", 1)[1][1:].rstrip("."))] for c in captions])


def classes_per_batch(batches) -> list[int]:
    return [len(set(tokens[:, 0].tolist())) for _, tokens in batches]


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """A 10-class ImageFolder sorted on disk (96 images a class), written in source order and in the default order."""
    tmp = tmp_path_factory.mktemp("sorted")
    for k in range(10):
        (tmp / "src" / f"k{k:02d}").mkdir(parents=True)
        for i in range(96):
            Image.new("RGB", (4, 4), (25 * k, i, 7)).save(tmp / "src" / f"k{k:02d}" / f"{i:03d}.png")
    for name, keep in (("kept", True), ("mixed", False)):
        write_shards(tmp / "src", tmp / name, templates=["a photo of a {c}."], shard_size=96, keep_order=keep,
                     progress=False)
    return {name: str(tmp / name / "shard-{000000..000009}.tar") for name in ("kept", "mixed")}


def test_class_sorted_folder_gives_batches_of_every_class(sorted_folder):
    # the shuffle buffer is a third of a shard, as in a run on CIFAR-10's 5,000-image class shards with 2,000
    def mix(name: str, **kw) -> list[int]:
        cfg = DataConfig(train=sorted_folder[name], batch_size=64, workers=0, shuffle_buffer=32, **kw)
        return classes_per_batch(run(cfg, tokenizer=class_tokenizer)[1])

    before = mix("kept", interleave_shards=1)  # source-order shards, one read after another
    interleaved = mix("kept")  # the same shards, the default interleaving
    after = mix("mixed")  # the default write order and interleaving
    assert len(before) == len(after) == 15
    assert max(before) <= 4 and sorted(before)[7] <= 3
    assert sorted(interleaved)[7] >= 4 and sum(interleaved) > 1.5 * sum(before)
    assert min(after) >= 8


def test_degenerate_batches_warn_once_naming_the_fix(sorted_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.loader"):
        cfg = DataConfig(train=sorted_folder["kept"], batch_size=64, workers=0, shuffle_buffer=32,
                         interleave_shards=1)
        loader, _ = run(cfg, tokenizer=class_tokenizer)
        warned = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
        assert len(warned) == 1
        assert "sorted" in warned[0] and "--keep-order" in warned[0] and "data.interleave_shards (now 1)" in warned[0]
        caplog.clear()
        mixed, _ = run(DataConfig(train=sorted_folder["mixed"], batch_size=64, workers=0), tokenizer=class_tokenizer)
        assert not [r for r in caplog.records if "degenerate" in r.getMessage()]
    assert mixed.metrics()["data/caption_diversity"] > 0.9
    # 64 samples of one to four classes: nearly every caption in a batch is shared (a class met at a shard's edge
    # may have one sample alone)
    row = {k.removeprefix("data/"): v for k, v in loader.metrics().items()}
    assert row.keys() == {"samples", "skipped", "repeated_captions", "caption_diversity"} and row["samples"] == 960
    assert 0.95 < row["repeated_captions"] <= 1.0
    assert row["caption_diversity"] < 0.5  # about 3 classes a batch where a random batch holds all 10
    assert loader.metrics() == {"data/samples": 960, "data/skipped": 0}  # the window starts again


def test_unique_captions_are_not_repeated(even_shards):
    loader, batches = run(DataConfig(train=even_shards, batch_size=8, workers=0))
    assert len(batches) == 6 and loader.metrics()["data/repeated_captions"] == 0.0
