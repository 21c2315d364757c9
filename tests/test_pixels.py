"""The uint8 pixel path (data.fast_decode, data.uint8_batches) against open_clip's PIL-to-float preprocessing."""

import io
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from vlpretrain.config import DataConfig, load_config
from vlpretrain.data import EpochBatches, build_loader
from vlpretrain.data.pixels import Normalize, decode_rgb, split_transform
from vlpretrain.data.stages import decode
from vlpretrain.data.stats import WorkerStats
from vlpretrain.errors import ConfigError

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
SIZE = 32


def photo(i: int, width: int = 96, height: int = 72) -> np.ndarray:
    """A smooth colour field with grain, different for every i (so crops and resampling have detail to move)."""
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height),
                                                                                  Image.Resampling.BICUBIC)
    return np.clip(np.asarray(small, dtype=np.float32) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    (img.convert(mode) if mode else img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, str, bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, data, caption in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def number_tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c.rsplit(" ", 1)[1])] for c in captions])


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> str:
    """4 shards x 8 photo-like JPEGs of assorted sizes (some large enough to be draft-decoded), one grayscale."""
    tmp = tmp_path_factory.mktemp("jpegs")
    for k in range(4):
        samples = []
        for j in range(8):
            i = 8 * k + j
            w, h = [(96, 72), (72, 96), (160, 120), (50, 40)][i % 4]
            data = encode(photo(i, w, h), mode="L" if i == 5 else None)
            samples.append((f"{i:04d}", "jpg", data, f"sample {i}"))
        write_tar(tmp / f"j-{k:06d}.tar", samples)
    return str(tmp / "j-{000000..000003}.tar")


def train_transform(scale=(0.3, 1.0)):
    return open_clip.image_transform(SIZE, is_train=True, aug_cfg={"scale": scale})


def batches(pattern: str, transform, defer: bool = False, workers: int = 0, start: int = 0, **options):
    cfg = DataConfig(train=pattern, batch_size=4, workers=workers, shuffle_buffer=6, seed=1, **options)
    loader = build_loader(cfg, transform, number_tokenizer, rank=0, world_size=1, epoch=1, start_batch=start,
                          defer_normalize=defer)
    return loader, list(loader)


def levels(floats: torch.Tensor) -> torch.Tensor:
    """Normalised floats back to the uint8 levels they were made from."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((floats * std + mean) * 255).round().to(torch.int32)


def test_uint8_batches_give_open_clip_floats_bit_for_bit(jpeg_shards):
    # PIL decoding and resampling on both sides, random crops on (scale 0.3-1): only the form in transit differs
    _, old = batches(jpeg_shards, train_transform(), fast_decode=False, uint8_batches=False)
    loader, new = batches(jpeg_shards, train_transform(), defer=True, fast_decode=False, uint8_batches=True)
    _, here = batches(jpeg_shards, train_transform(), fast_decode=False, uint8_batches=True)
    assert len(old) == len(new) == 8
    for (xo, to), (xn, tn), (xh, th) in zip(old, new, here):
        assert xo.dtype == torch.float32 and xn.dtype == torch.uint8 and xh.dtype == torch.float32
        assert torch.equal(to, tn) and torch.equal(to, th)
        assert torch.equal(loader.normalize(xn), xo) and torch.equal(xh, xo)  # tolerance: none
        assert torch.equal(loader.normalize(xn, torch.bfloat16), xo.to(torch.bfloat16))


def test_fast_decode_is_within_resampling_rounding_of_pil(jpeg_shards):
    # the same crop boxes (drawn by torchvision's get_params from the same seeds) and the same decoded pixels,
    # resampled by torch's uint8 kernels instead of PIL's: tolerance 2 levels (of 255) per pixel, 0.1 on average.
    # Most differ on the crops these small images must enlarge; shrinking ones differ on well under 1% of pixels.
    _, old = batches(jpeg_shards, train_transform(), fast_decode=False, uint8_batches=False)
    _, new = batches(jpeg_shards, train_transform(), defer=True)
    diff = torch.cat([(levels(xo) - xn.to(torch.int32)).abs().flatten() for (xo, _), (xn, _) in zip(old, new)])
    assert diff.max() <= 2
    assert diff.float().mean() < 0.1
    _, shifted = batches(jpeg_shards, train_transform(scale=(0.3, 0.31)), defer=True)
    other = torch.cat([(levels(xo) - xn.to(torch.int32)).abs().flatten() for (xo, _), (xn, _) in zip(old, shifted)])
    assert other.float().mean() > 5  # the comparison above can tell a different crop apart


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_fast_path_is_seeded_and_resumes_exactly(jpeg_shards, workers):
    loader, full = batches(jpeg_shards, train_transform(), defer=True, workers=workers)
    _, again = batches(jpeg_shards, train_transform(), defer=True, workers=workers)
    _, resumed = batches(jpeg_shards, train_transform(), defer=True, workers=workers, start=3)
    assert all(x.dtype == torch.uint8 and x.shape == (4, 3, SIZE, SIZE) and x.is_contiguous() for x, _ in full)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))
    assert loader.stats.samples == 32 and loader.stats.bad == 0


def test_decode_rgb_gives_the_pixels_pil_gives():
    rgb = photo(3, 200, 150)
    cases = {"jpeg": encode(rgb), "gray jpeg": encode(rgb, mode="L"), "cmyk jpeg": encode(rgb, mode="CMYK"),
             "png": encode(rgb, "PNG"), "rgba png": encode(rgb, "PNG", mode="RGBA")}
    for name, data in cases.items():
        for draft in (None, 64, 150):
            sample = {"__key__": "k", "__url__": "u", "ext": "jpg", "bytes": data}
            (pil,) = decode([dict(sample)], WorkerStats(), draft=draft)
            (fast,) = decode([dict(sample)], WorkerStats(), draft=draft, as_tensor=True)
            want = torch.from_numpy(np.array(pil["image"])).permute(2, 0, 1)
            assert fast["image"].dtype == torch.uint8 and torch.equal(fast["image"], want), (name, draft)
    assert decode_rgb(cases["jpeg"], 64).shape == (3, 75, 100)  # drafted to 1/2, as stages.decode does


def test_undecodable_images_are_counted_on_the_fast_path(tmp_path):
    good = encode(photo(0))
    samples = [(f"{i}", "jpg", good, f"sample {i}") for i in range(5)]
    samples[1] = ("1", "jpg", good[: len(good) // 2], "sample 1")  # cut inside the scan
    samples[2] = ("2", "jpg", b"\xff\xd8 not a jpeg", "sample 2")
    write_tar(tmp_path / "b-000000.tar", samples)
    cfg = DataConfig(train=str(tmp_path / "b-000000.tar"), batch_size=3, workers=0, error_budget=1.0)
    loader = build_loader(cfg, train_transform(), number_tokenizer, rank=0, world_size=1)
    (images, _), = list(loader)
    assert images.dtype == torch.float32 and dict(loader.stats.skipped) == {"undecodable image": 2}


def test_eval_transform_splits_and_stays_close_to_pil():
    pixels = split_transform(open_clip.image_transform(SIZE, is_train=False, mean=MEAN, std=STD))
    assert pixels is not None and pixels.tensor is not None and pixels.normalize.mean == tuple(MEAN)
    img = Image.fromarray(photo(7, 90, 70))
    pil = pixels.pil(img)
    fast = pixels.tensor(decode_rgb(encode(np.asarray(img), "PNG"), None))
    assert pil.shape == fast.shape == (3, SIZE, SIZE)
    assert (pil.to(torch.int32) - fast.to(torch.int32)).abs().max() <= 2


def test_transforms_without_a_tensor_form_keep_pil_and_others_are_applied_as_they_are(jpeg_shards):
    jitter = T.Compose([T.RandomResizedCrop(SIZE), T.ColorJitter(0.4), T.ToTensor(), T.Normalize(MEAN, STD)])
    pixels = split_transform(jitter)
    assert pixels is not None and pixels.tensor is None  # PIL steps, uint8 batches all the same
    loader, got = batches(jpeg_shards, jitter, defer=True)
    assert loader.uint8_batches and not loader.decode_tensors and got[0][0].dtype == torch.uint8
    assert split_transform(lambda img: torch.zeros(3, 2, 2)) is None
    assert split_transform(T.Compose([T.ToTensor()])) is None
    plain = T.Compose([T.Resize(SIZE), T.CenterCrop(SIZE), T.PILToTensor()])  # no Normalize: applied as it is
    loader, got = batches(jpeg_shards, plain, defer=True)
    assert not loader.uint8_batches and loader.normalize(got[0][0], torch.float32).dtype == torch.float32


def test_normalize_casts_what_is_already_normalised():
    norm = Normalize(MEAN, STD)
    floats = torch.rand(2, 3, 4, 4)
    assert torch.equal(norm(floats), floats) and norm(floats, torch.bfloat16).dtype == torch.bfloat16
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    by_hand = T.Normalize(MEAN, STD)(u8.float().div(255))
    assert torch.equal(norm(u8), by_hand)
    assert torch.equal(EpochBatches(lambda e, b: []).normalize(floats, torch.float64), floats.double())


def test_options_are_validated_naming_the_key(tmp_path):
    for key in ("fast_decode", "uint8_batches"):
        with pytest.raises(ConfigError, match=f"data.{key}: expected true or false, got 'yes'"):
            DataConfig(train="x.tar", **{key: "yes"}).validate()
        cfg = load_config(None, ["data.train=x.tar", f"data.{key}=false"])
        assert getattr(cfg.data, key) is False
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_config(None, ["data.train=x.tar", f"data.{key}=sometimes"])


def grey16_png() -> tuple[bytes, np.ndarray]:
    """A 16 x 16 16-bit grey PNG (PIL mode "I;16") spanning the full 0..65535 range: pixel i holds i * 256 plus a
    varying low byte, and the 8-bit level it stands for, i (its high byte)."""
    levels8 = np.arange(256, dtype=np.uint16).reshape(16, 16)
    values = levels8 * 256 + (levels8 * 37) % 256
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16" and values.max() > 65000
    return buf.getvalue(), levels8.astype(np.uint8)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_16_bit_png_is_trained_on_at_its_brightness(tmp_path, fast_decode):
    """A 16-bit grey PNG decodes to each value's high byte on the loader's fast and PIL paths (it was near-white:
    PIL's convert("RGB") clips values above 255), so batches hold the expected 8-bit levels exactly (#23.9a)."""
    data, want = grey16_png()
    write_tar(tmp_path / "g-000000.tar", [(f"{i:04d}", "png", data, f"sample {i}") for i in range(4)])
    identity = T.Compose([T.CenterCrop(16), T.ToTensor(), T.Normalize((0, 0, 0), (1, 1, 1))])
    loader, got = batches(str(tmp_path / "g-000000.tar"), identity, defer=True, fast_decode=fast_decode)
    assert loader.decode_tensors == fast_decode
    (images, _), = got
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(want).expand(4, 3, 16, 16))


def test_16_bit_png_is_written_as_8_bit_and_read_alike_by_zeroshot(tmp_path):
    """make-shards stores a 16-bit grey PNG as an 8-bit PNG of its high bytes (so any reader sees its brightness),
    and zeroshot's image files and benchmark shards decode to the same levels (#23.9a)."""
    from vlpretrain.data import write_shards
    from zeroshot.datasets.common import open_rgb
    from zeroshot.datasets.wds import ShardSamples

    data, want = grey16_png()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(data)
    (src / "a.txt").write_text("a gradient")
    write_shards(src, tmp_path / "out", "folder", progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        stored = Image.open(io.BytesIO(tar.extractfile("000000000.png").read()))
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), want)
    rgb = np.repeat(want[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(open_rgb(src / "a.png")), rgb)
    write_tar(tmp_path / "bench.tar", [("0", "png", data, "a gradient")])
    with tarfile.open(tmp_path / "bench.tar") as tar:
        member = tar.getmember("0.png")
    image, _ = ShardSamples([(tmp_path / "bench.tar", member.offset_data, member.size, 0)])[0]
    assert np.array_equal(np.asarray(image), rgb)
