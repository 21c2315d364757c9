"""vlpretrain curate: CLIP-score filter, caption rules, duplicates, decontamination, the cache, the output, the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpretrain.cli import main
from vlpretrain.curation import CaptionRules, Scorer, apply_rules, curate, embed_shards, load_embeddings
from vlpretrain.curation import decontaminate as decon
from vlpretrain.curation import dedup as dedup_module
from vlpretrain.curation.embed import NEAR_COSINE, thumbnail
from vlpretrain.data.writer import ShardSink
from vlpretrain.errors import ConfigError
from vlpretrain.formats import MANIFEST


def smooth_image(seed: int, side: int = 28) -> Image.Image:
    """A random smooth RGB image (a 7x7 field upscaled): distinct per seed, with structure that survives resizing."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
    return small.resize((side, side), Image.Resampling.BICUBIC)


def detailed_image(seed: int, side: int = 28) -> Image.Image:
    """A random grey image with detail near its own resolution (a 14x14 field upscaled), as Fashion-MNIST has."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (14, 14), dtype=np.uint8)).convert("RGB")
    return small.resize((side, side), Image.Resampling.BICUBIC)


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def resized_jpeg(img: Image.Image, side: int = 64, quality: int = 85) -> bytes:
    return encoded(img.resize((side, side), Image.Resampling.BICUBIC), "JPEG", quality=quality)


def write_dataset(folder: Path, samples: list[tuple[bytes, str, str]], per_shard: int = 4) -> list[str]:
    """Shards of (image bytes, image extension, caption) plus a manifest, as make-shards writes them; the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(folder, "in", per_shard, None)
    keys = []
    for i, (data, ext, caption) in enumerate(samples):
        keys.append(f"{i:06d}")
        sink.add(keys[-1], [(ext, data), ("txt", caption.encode()), ("json", json.dumps({"i": i}).encode())])
    shards = sink.finish()
    (folder / MANIFEST).write_text(json.dumps({"shards": shards, "samples": len(samples)}))
    return keys


def read_output(folder: Path) -> dict[str, dict]:
    """{key: json member} of every sample in a curated folder's shards (the manifest's shards, in order)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    out: dict[str, dict] = {}
    for s in manifest["shards"]:
        with tarfile.open(folder / s["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "json":
                    out[key] = json.loads(tar.extractfile(m).read())
    assert sum(s["samples"] for s in manifest["shards"]) == len(out) == manifest["samples"]
    return out


CAPTIONS = ["a red square", "a photo of a dog", "a small blue circle on grey", "two cats", "a green field",
            "a shoe", "a bag on a table", "a tree in winter", "an old car", "a cup of tea"]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    from vlpretrain.models import build_model, get_tokenizer, image_transform

    torch.manual_seed(0)
    model = build_model("tiny-vit", load_pretrained=False)
    return Scorer(model, get_tokenizer("tiny-vit"), image_transform(model, train=False))


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, list[str], list[Image.Image]]:
    images = [smooth_image(i) for i in range(10)]
    keys = write_dataset(tmp_path / "in", [(encoded(im), "png", c) for im, c in zip(images, CAPTIONS)])
    return tmp_path / "in", keys, images


def hand_scores(scorer: Scorer, images: list[Image.Image], captions: list[str]) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack([scorer.transform(im) for im in images])
        i = F.normalize(scorer.model.encode_image(x), dim=-1)
        t = F.normalize(scorer.model.encode_text(scorer.tokenizer(captions)), dim=-1)
    return (i * t).sum(-1).numpy()


def test_score_filter_keeps_exactly_the_pairs_at_or_above_the_threshold(scorer, dataset, tmp_path):
    folder, keys, images = dataset
    scores = hand_scores(scorer, images, CAPTIONS)
    threshold = float(np.sort(scores)[4] + np.sort(scores)[5]) / 2  # between the 5th and 6th: five pass
    r = curate(str(folder), tmp_path / "out", scorer, threshold=threshold, progress=False, report=False)
    out = read_output(tmp_path / "out")
    assert set(out) == {k for k, s in zip(keys, scores) if s >= threshold} and len(out) == 5
    for k, meta in out.items():
        assert meta["clip_score"] == pytest.approx(float(scores[keys.index(k)]), abs=1e-5)
        assert meta["i"] == keys.index(k)  # the input json member is kept, the score added
    assert r["removed"]["low score"] == 5 and r["score_threshold"] == threshold
    # a top fraction: the 3 best pairs (ceil(0.3 * 10)), from the cache this time
    r = curate(str(folder), tmp_path / "out", scorer, fraction=0.3, progress=False, report=False)
    assert r["embedded_shards"] == 0 and r["cached_shards"] == 3
    assert set(read_output(tmp_path / "out")) == {keys[i] for i in np.argsort(-scores)[:3]}


def test_caption_rules_on_hand_cases():
    captions = ["a dog on a beach", "dog", "a photo of a cat sitting on a very long red sofa in the sun", "",
                "un chien noir dort sur le canapé du salon", "IMG_2041.jpg", "lorem ipsum dolor sit amet",
                "click here to buy", "shoes shoes shoes shoes", "a dog on a beach", "a dog on a beach!"]
    got = apply_rules(captions, CaptionRules(min_words=2, max_words=10, languages=("en",), max_repeats=2,
                                             boilerplate=True, max_repeated_words=0.5))
    as_rows = {name: [i for i, x in enumerate(mask) if x] for name, mask in got.items()}
    assert as_rows["length"] == [1, 2, 3]  # 1 word, 14 words, none
    assert as_rows["repeated"] == [0, 9, 10]  # the same words three times (punctuation and case ignored)
    assert as_rows["boilerplate"] == [5, 6, 7]  # a file name, lorem ipsum, click here
    assert as_rows["repetitive"] == [8]  # 3 of 4 words repeat an earlier one
    assert 4 in as_rows["language"] and 0 not in as_rows["language"] and 2 not in as_rows["language"]
    assert apply_rules(captions, CaptionRules()) == {}  # every rule is optional
    with pytest.raises(ConfigError, match="min_words 5 > max_words 2"):
        CaptionRules(min_words=5, max_words=2)


def test_exact_and_near_duplicates_are_removed_keeping_the_first(dataset, tmp_path):
    _, _, images = dataset
    samples = [(encoded(im), "png", c) for im, c in zip(images, CAPTIONS)]
    samples.append((encoded(images[2], compress_level=1), "png", "exact copy, other bytes"))  # row 10
    samples.append((resized_jpeg(images[5]), "jpg", "resized and re-encoded"))  # row 11
    samples.append((resized_jpeg(images[5], 40, 70), "jpg", "another copy of 5"))  # row 12
    keys = write_dataset(tmp_path / "dups", samples)
    assert encoded(images[2], compress_level=1) != samples[2][0]
    r = curate(str(tmp_path / "dups"), tmp_path / "out", exact_dedup=True, progress=False, report=False)
    assert set(read_output(tmp_path / "out")) == set(keys) - {keys[10]}
    assert r["removed"]["exact duplicate"] == 1
    r = curate(str(tmp_path / "dups"), tmp_path / "out", exact_dedup=True, near_dedup=0.985, progress=False,
               report=False)
    assert set(read_output(tmp_path / "out")) == set(keys) - {keys[10], keys[11], keys[12]}
    assert r["removed"]["near duplicate"] == 2 and r["near_groups"] == 1


def test_approximate_near_duplicate_search_finds_the_groups_brute_force_finds(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1500, 64)).astype(np.float32)
    groups = [(int(i), 1 + int(k)) for i, k in zip(rng.choice(1500, 60, replace=False), rng.integers(1, 4, 60))]
    copies = [base[i] + 0.05 * rng.standard_normal(64).astype(np.float32) for i, k in groups for _ in range(k)]
    x = np.concatenate([base, np.stack(copies)])
    x = x[rng.permutation(len(x))]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    every = np.ones(len(x), dtype=bool)
    used: list[bool] = []
    real_index = dedup_module.similarity_index
    monkeypatch.setattr(dedup_module, "similarity_index", lambda v, approximate: used.append(approximate) or
                        real_index(v, approximate))
    exact, exact_groups = dedup_module.near_duplicates(x, every, 0.99, approximate_above=len(x))
    approx, approx_groups = dedup_module.near_duplicates(x, every, 0.99, approximate_above=0)
    assert used == [False, True]
    assert exact_groups == approx_groups == 60 and exact.sum() == sum(k for _, k in groups)
    assert np.array_equal(exact, approx)


def test_decontamination_finds_planted_test_images(dataset, tmp_path, monkeypatch):
    _, _, images = dataset
    test_images = [smooth_image(1000 + i) for i in range(20)]
    monkeypatch.setattr(decon, "benchmark_images", lambda name, root: test_images)
    samples = [(encoded(im), "png", c) for im, c in zip(images, CAPTIONS)]
    samples += [(resized_jpeg(test_images[i], 56 + i), "jpg", "planted") for i in (3, 7, 11)]
    keys = write_dataset(tmp_path / "in2", samples)
    r = curate(str(tmp_path / "in2"), tmp_path / "out", decontaminate=("fake",), benchmark_root=str(tmp_path),
               progress=False, report=False)
    found = r["contamination"]["fake"]
    assert found["flagged"] == 3 and not found["removed"]
    assert sorted((e["key"], e["test_index"]) for e in found["examples"]) == \
        [(keys[10], 3), (keys[11], 7), (keys[12], 11)]
    assert len(read_output(tmp_path / "out")) == 13  # reported, not removed
    r = curate(str(tmp_path / "in2"), tmp_path / "out", decontaminate=("fake",), benchmark_root=str(tmp_path),
               remove_contaminated=True, progress=False, report=False)
    assert set(read_output(tmp_path / "out")) == set(keys[:10]) and r["removed"]["contaminated:fake"] == 3


def test_decontamination_finds_copies_resized_down_below_the_test_images(tmp_path, monkeypatch):
    # 28 px test images with fine detail, copied at 20-23 px as JPEG q60: 16x16 thumbnails scored the 20-21 px
    # copies 0.975-0.982 (missed at the old default 0.985); 12x12 ones score them >= 0.993
    test_images = [detailed_image(i) for i in range(6)]
    monkeypatch.setattr(decon, "benchmark_images", lambda name, root: test_images)
    others = [(encoded(detailed_image(100 + i)), "png", "other") for i in range(6)]
    copies = [(resized_jpeg(test_images[i], 20 + i, 60), "jpg", "copy") for i in range(4)]
    keys = write_dataset(tmp_path / "in", others + copies)
    r = curate(str(tmp_path / "in"), tmp_path / "out", decontaminate=("fake",), benchmark_root=str(tmp_path),
               remove_contaminated=True, progress=False, report=False)
    found = r["contamination"]["fake"]
    assert found["flagged"] == 4
    assert sorted((e["key"], e["test_index"]) for e in found["examples"]) == [(keys[6 + i], i) for i in range(4)]
    assert set(read_output(tmp_path / "out")) == set(keys[:6])


def test_benchmark_images_come_from_the_registry_by_entry_point(tmp_path):
    from helpers import mnist_arrays, write_idx

    labels = [3, 1, 4, 1, 5]
    arr = mnist_arrays(labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", arr)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8))
    images = decon.benchmark_images("fashion-mnist", tmp_path)
    assert len(images) == 5 and np.array_equal(np.asarray(images[2].convert("L")), arr[2])


def test_an_interrupted_embedding_pass_resumes_to_identical_embeddings(scorer, dataset, tmp_path):
    folder, _, _ = dataset
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    embed_shards(urls, tmp_path / "whole", scorer, progress=False)
    whole = load_embeddings(urls, tmp_path / "whole", scorer)

    def stop_after_first(url: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_shards(urls, tmp_path / "cut", scorer, progress=False, after_shard=stop_after_first)
    assert load_embeddings(urls, tmp_path / "cut", scorer) is None  # two shards missing: not taken as whole
    done = sorted((tmp_path / "cut").rglob("*.safetensors"))
    assert len(done) == 1
    half = done[0].with_name(done[0].name.replace("in-000000", "in-000001"))
    half.write_bytes(done[0].read_bytes()[:300])  # a file cut short under a final name is not trusted either
    assert embed_shards(urls, tmp_path / "cut", scorer, progress=False) == 2
    resumed = load_embeddings(urls, tmp_path / "cut", scorer)
    assert resumed.keys == whole.keys and resumed.captions == whole.captions
    for name in ("hashes", "thumbs", "image", "text"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name)), name


def test_a_pass_killed_within_a_shard_resumes_from_its_saved_rows(scorer, dataset, tmp_path, monkeypatch):
    folder, _, _ = dataset  # shards of 4, 4 and 2 samples
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    embed_shards(urls, tmp_path / "whole", scorer, progress=False, save_every=0)
    whole = load_embeddings(urls, tmp_path / "whole", scorer)
    encode, calls = scorer.encode, []

    def counted(images, captions, stop_at: int | None = None):
        calls.append(len(images))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return encode(images, captions)

    # batches of 2, rows saved every 2: killed in the second shard after its first two rows were saved
    monkeypatch.setattr(scorer, "encode", lambda i, c: counted(i, c, stop_at=4))
    with pytest.raises(KeyboardInterrupt):
        embed_shards(urls, tmp_path / "cut", scorer, progress=False, batch_size=2, save_every=2)
    assert len(list((tmp_path / "cut").rglob("*.partial.safetensors"))) == 1
    calls.clear()
    monkeypatch.setattr(scorer, "encode", lambda i, c: counted(i, c))
    assert embed_shards(urls, tmp_path / "cut", scorer, progress=False, batch_size=2, save_every=2) == 2
    assert calls == [2, 2]  # the second shard's last two samples and the third shard's two, nothing again
    assert not list((tmp_path / "cut").rglob("*.partial.safetensors"))
    resumed = load_embeddings(urls, tmp_path / "cut", scorer)
    assert resumed.keys == whole.keys and resumed.captions == whole.captions
    for name in ("hashes", "thumbs", "image", "text"):
        assert np.allclose(getattr(resumed, name), getattr(whole, name), atol=1e-6), name


def test_output_manifest_appears_only_when_the_whole_dataset_is_written(dataset, tmp_path, monkeypatch):
    folder, keys, _ = dataset
    curate(str(folder), tmp_path / "out", exact_dedup=True, progress=False, report=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    calls = {"n": 0}
    real_add = ShardSink.add

    def failing_add(self, key, files):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full")
        return real_add(self, key, files)

    monkeypatch.setattr(ShardSink, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        curate(str(folder), tmp_path / "out", shard_size=2, progress=False, report=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before  # the earlier dataset, whole; no shard of the failed run, no staging folder left
    assert not (tmp_path / "out" / ".make-shards-incomplete").exists()
    monkeypatch.undo()
    assert len(read_output(tmp_path / "out")) == len(keys)


def test_cli_end_to_end_with_a_corrupt_sample_and_bad_input(scorer, dataset, tmp_path, capsys):
    from vlpretrain.config import ModelConfig
    from vlpretrain.models import export_model

    _, _, images = dataset
    model_file = export_model(scorer.model, ModelConfig(name="tiny-vit"), tmp_path / "m.safetensors")
    samples = [(encoded(im), "png", c) for im, c in zip(images, CAPTIONS)]
    samples.insert(4, (b"\x89PNG not really", "png", "a broken file"))
    write_dataset(tmp_path / "in3", samples)
    out = tmp_path / "out"
    assert main(["curate", str(tmp_path / "in3"), str(out), "--model", str(model_file), "--fraction", "0.5",
                 "--min-words", "3", "--exact-dedup", "--no-progress"]) == 0
    line = capsys.readouterr().out
    scores = hand_scores(scorer, images, CAPTIONS)
    top5 = set(np.argsort(-scores)[:5].tolist())  # the corrupt sample is not in the pool the fraction ranks
    kept = {i for i in top5 if len(CAPTIONS[i].split()) >= 3}  # "two cats" and "a shoe" are too short
    assert f"kept {len(kept)} of 11 samples" in line and "undecodable image: 1" in line
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["skipped"]["by_reason"] == {"undecodable image": 1} and manifest["samples"] == len(kept)
    assert sorted(m["i"] for m in read_output(out).values()) == sorted(i + (i >= 4) for i in kept)
    report = json.loads((out / "curation_report.json").read_text())
    assert report["flagged"]["low score"] == 5 and report["flagged"]["length"] == 2
    assert (out / "curation_report.png").stat().st_size > 10000
    for argv, message in [
        (["curate", str(tmp_path / "nowhere"), str(out)], "input shards folder does not exist"),
        (["curate", str(tmp_path / "in3"), str(out), "--model", str(model_file), "--threshold", "1.5"],
         "threshold: a CLIP score (cosine) in [-1, 1], got 1.5"),
        (["curate", str(tmp_path / "in3"), str(out), "--fraction", "0.5"], "needs a model"),
        (["curate", str(tmp_path / "in3"), str(out), "--decontaminate", "fashion-mnist"], "--benchmark-root"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_thumbnail_descriptor_matches_copies_not_other_images():
    a, b = smooth_image(1), smooth_image(2)
    copy = Image.open(io.BytesIO(resized_jpeg(a, 80, 75)))
    assert float(thumbnail(a) @ thumbnail(copy)) > NEAR_COSINE > float(thumbnail(a) @ thumbnail(b))


def test_overlap_split_metrics_by_hand():
    from zeroshot.overlap import split_metrics

    logits = torch.tensor([[2.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1], [0, 2, 1], [1, 0, 2]])  # argmax 0 1 2 0 1 2
    labels = torch.tensor([0, 1, 0, 0, 2, 2])
    overlap = torch.tensor([True, True, True, False, False, False])
    m = split_metrics(logits, labels, overlap)
    assert m["top1"] == pytest.approx(4 / 6) and m["overlap_top1"] == pytest.approx(2 / 3)
    assert m["clean_top1"] == pytest.approx(2 / 3) and m["overlap_images"] == 3 and m["overlap_fraction"] == 0.5


def test_zeroshot_eval_overlap_with_shards(scorer, tmp_path, capsys):
    from helpers import write_idx

    from vlpretrain.config import ModelConfig
    from vlpretrain.models import export_model
    from zeroshot.cli import main as zeroshot_main

    labels = [i % 10 for i in range(12)]
    arr = np.stack([np.asarray(smooth_image(100 + i).convert("L")) for i in range(12)])
    write_idx(tmp_path / "fm" / "t10k-images-idx3-ubyte.gz", arr)
    write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8))
    planted = [1, 5, 8]
    samples = [(encoded(smooth_image(i)), "png", "a picture") for i in range(6)]
    samples += [(resized_jpeg(Image.fromarray(arr[i]).convert("RGB"), 60), "jpg", "a copy") for i in planted]
    write_dataset(tmp_path / "train", samples)
    model_file = export_model(scorer.model, ModelConfig(name="tiny-vit"), tmp_path / "m.safetensors")
    assert zeroshot_main(["eval", "--model", str(model_file), "--benchmark", "fashion-mnist", "--root",
                          str(tmp_path / "fm"), "--overlap-with", str(tmp_path / "train"), "--overlap-cache",
                          str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "overlap with" in capsys.readouterr().out
    m = json.loads((tmp_path / "r.json").read_text())["results"][0]["metrics"]
    assert m["overlap_images"] == 3 and m["clean_images"] == 9 and m["images"] == 12


def test_ranks_split_the_embedding_and_rank_0_writes(dataset, tmp_path):
    import vlpretrain

    assert vlpretrain.curate is curate  # the public API
    folder, keys, _ = dataset
    cache = tmp_path / "cache"
    r1 = curate(str(folder), tmp_path / "out", exact_dedup=True, cache_dir=cache, rank=1, world_size=2,
                progress=False)
    assert r1 == {"rank": 1, "embedded_shards": 1} and not (tmp_path / "out" / MANIFEST).exists()
    assert [p.name.split("-")[1] for p in sorted((cache / "pixels").iterdir())] == ["000001"]  # shards 1::2
    r0 = curate(str(folder), tmp_path / "out", exact_dedup=True, cache_dir=cache, rank=0, world_size=2,
                progress=False, report=False)
    assert r0["embedded_shards"] == 2 and set(read_output(tmp_path / "out")) == set(keys)


def test_a_repeated_caption_is_encoded_once_and_embeds_as_when_alone(scorer):
    sent: list[str] = []

    def tokenizer(captions: list[str]) -> torch.Tensor:
        sent.extend(captions)
        return scorer.tokenizer(captions)

    fresh = Scorer(scorer.model, tokenizer, scorer.transform, digest="test")
    first = fresh.encode_captions(["two cats", "a shoe", "two cats", "a shoe", "two cats"])
    second = fresh.encode_captions(["a shoe", "an old car", "two cats"])
    assert sent == ["two cats", "a shoe", "an old car"]
    with torch.no_grad():
        alone = {c: F.normalize(scorer.model.encode_text(scorer.tokenizer([c])), dim=-1)[0].numpy()
                 for c in ("two cats", "a shoe", "an old car")}
    np.testing.assert_allclose(first, np.stack([alone[c] for c in ["two cats", "a shoe", "two cats", "a shoe",
                                                                    "two cats"]]), atol=1e-5)
    np.testing.assert_allclose(second, np.stack([alone[c] for c in ["a shoe", "an old car", "two cats"]]), atol=1e-5)
