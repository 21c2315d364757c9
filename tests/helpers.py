"""What several test modules share: launching the trainer in subprocesses (the environment, a free port, the
synthetic training script, its losses), a plain-torch stand-in for the engine, and writers of small fake benchmark
data in each on-disk format the zeroshot loaders read."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlpretrain.models import load_state_dict

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = str(HERE / "train_synthetic.py")
FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, which the Makefile installs
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that runs our code: no launcher variables inherited (a child is its
    own job), the CPU accelerator, one thread per process, the repository importable; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


ENV = subprocess_env()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (with --master_port=0 DeepSpeed's CPU shared-memory comm never meets)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, script_and_args: list[str]) -> list[str]:
    """The command that runs `script_and_args` (a script path or `-m module`, then its arguments) in one process,
    or in `nproc` under torchrun on a free port."""
    if nproc == 1:
        return [sys.executable, *script_and_args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *script_and_args]


def run(out, *overrides: str, nproc: int = 1, extra=(), check: bool = True, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """tests/train_synthetic.py into `out` with `section.key=value` overrides, in `nproc` processes."""
    r = subprocess.run(launch(nproc, [SCRIPT, str(out), *extra, *overrides]), env=env or ENV, capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out) -> dict[int, float]:
    """{step: logged loss} of a run folder's metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# settings of the short trainer runs compared step by step (a large eps: Adam moves fp32 and bf16 alike)
COMMON = ["train.steps=3", "train.warmup_steps=1", "train.eps=0.01"]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights a run saved at `step`."""
    return load_state_dict(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_run(a: Path, b: Path, steps: int, rel: float = 1e-5) -> None:
    """Two run folders logged the same losses at every step (within `rel`) and saved the same final weights."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=rel), s
    wa, wb = weights(a, steps), weights(b, steps)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


def moe_zero3_follows_zero0(out: Path, *settings: str) -> dict:
    """Train `settings` (an MoE model, 2 steps) under ZeRO-0 and ZeRO-3 into out/z0 and out/z3; the losses agree
    within 1e-5 and training moved. Returns ZeRO-3's first metrics row (its MoE statistics)."""
    run(out / "z0", *settings)
    run(out / "z3", *settings, "train.zero_stage=3")
    a, b = losses(out / "z0"), losses(out / "z3")
    assert sorted(a) == sorted(b) == [1, 2] and a[2] != a[1]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
    return json.loads((out / "z3" / "metrics.jsonl").read_text().splitlines()[0])


class TorchEngine:
    """The Engine calls an accumulation makes, over a plain module: gradients accumulate in .grad, step counts."""

    def __init__(self, module: torch.nn.Module, micro_steps: int):
        self.module, self.micro_steps, self.steps = module, micro_steps, 0

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss, average_micro_steps=True):
        (loss / self.micro_steps if average_micro_steps else loss).backward()

    def step(self):
        self.steps += 1


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters' accumulated gradients, by name."""
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}



COLOURS = [(220, 20, 60), (30, 144, 255), (50, 205, 50), (255, 215, 0), (148, 0, 211), (255, 140, 0),
           (0, 206, 209), (139, 69, 19), (255, 105, 180), (128, 128, 128)]


def drawn_image(label: int, size: int = 32, seed: int = 0) -> Image.Image:
    """A PIL image whose colour and square position depend on the label (and jitter on the seed)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (int(rng.integers(0, 40)),) * 3)
    d = ImageDraw.Draw(im)
    off = int(rng.integers(0, size // 4))
    d.rectangle([off, off, off + size // 2, off + size // 2], fill=COLOURS[label % len(COLOURS)])
    return im


def write_cifar(folder: Path, labels: list[int], name: str, key: str = "labels") -> np.ndarray:
    """One CIFAR python batch (a pickled dict with bytes keys, 'data' rows of R, G, B planes); returns images."""
    images = np.stack([np.asarray(drawn_image(y, 32, i)) for i, y in enumerate(labels)])
    data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"testing batch 1 of 1", key.encode(): list(labels), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return images


def idx_bytes(array: np.ndarray) -> bytes:
    """MNIST's idx encoding of a uint8 array."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An idx file, gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def mnist_arrays(labels: list[int]) -> np.ndarray:
    return np.stack([np.asarray(drawn_image(y, 28, i).convert("L")) for i, y in enumerate(labels)])


def write_folder_tree(base: Path, folders: list[str], per_class: int, ext: str = ".JPEG") -> dict[str, int]:
    """ImageFolder tree `base/<folder>/<n><ext>`; returns folder -> number of images."""
    counts = {}
    for i, f in enumerate(folders):
        (base / f).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            drawn_image(i, 24, j).save(base / f / f"{f}_{j}{ext}", format="JPEG" if ext.lower() in (".jpeg", ".jpg")
                                       else "PNG")
        counts[f] = per_class
    return counts


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, classnames: list[str], labels: list[int], templates: list[str] | None = None,
              shards: int = 2, ext: str = "webp", split: str = "test", nshards_file: bool = True) -> Path:
    """CLIP_benchmark's webdataset layout: classnames.txt, templates, <split>/{0..n-1}.tar of <key>.<ext> + .cls."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (root / split).mkdir(exist_ok=True)
    per = -(-len(labels) // shards)
    for s in range(shards):
        with tarfile.open(root / split / f"{s}.tar", "w") as tar:
            for i in range(s * per, min(len(labels), (s + 1) * per)):
                buf = io.BytesIO()
                drawn_image(labels[i], 24, i).save(buf, format={"jpg": "JPEG"}.get(ext, ext.upper()))
                _add(tar, f"s{i:06d}.{ext}", buf.getvalue())
                _add(tar, f"s{i:06d}.cls", str(labels[i]).encode())
    if nshards_file:
        (root / split / "nshards.txt").write_text(f"{shards}\n")
    return root


def write_clevr(root: Path, object_depths: list[list[float]]) -> Path:
    """torchvision's CLEVR layout with one val scene per entry (object depths as pixel_coords[2])."""
    base = root / "clevr" / "CLEVR_v1.0"
    (base / "images" / "val").mkdir(parents=True, exist_ok=True)
    (base / "scenes").mkdir(parents=True, exist_ok=True)
    scenes = []
    for i, depths in enumerate(object_depths):
        name = f"CLEVR_val_{i:06d}.png"
        drawn_image(len(depths), 32, i).save(base / "images" / "val" / name)
        scenes.append({"image_filename": name, "objects": [{"pixel_coords": [10, 20, d]} for d in depths]})
    (base / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": scenes}))
    return root


def write_kitti(root: Path, frames: list[list[tuple[str, float]]]) -> Path:
    """torchvision's Kitti layout: training/image_2/<id>.png and label_2/<id>.txt with (type, depth) objects."""
    base = root / "Kitti" / "raw" / "training"
    (base / "image_2").mkdir(parents=True, exist_ok=True)
    (base / "label_2").mkdir(parents=True, exist_ok=True)
    for i, objects in enumerate(frames):
        drawn_image(i, 32, i).save(base / "image_2" / f"{i:06d}.png")
        lines = [f"{t} 0.00 0 -1.57 100.0 150.0 200.0 250.0 1.5 1.6 3.9 2.0 1.7 {z:.2f} -1.5" for t, z in objects]
        (base / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_voc(root: Path, images: dict[str, list[tuple[str, tuple[int, int, int, int]]]]) -> Path:
    """torchvision's VOC2007 layout: ImageSets/Main/test.txt, Annotations/<id>.xml, JPEGImages/<id>.jpg."""
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for n, (image_id, objects) in enumerate(images.items()):
        drawn_image(n, 64, n).save(base / "JPEGImages" / f"{image_id}.jpg")
        objs = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                       f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in objects)
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation><filename>{image_id}.jpg</filename>"
                                                             f"{objs}</annotation>")
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(images) + "\n")
    return root


# Captioned images for retrieval: each writer takes one caption list per image (image i is drawn_image(i, 24, i)).

def write_flickr(root: Path, prefix: str, captions: list[list[str]], image_dir: str = "", split: str = "test") -> Path:
    """CLIP_benchmark's Flickr layout: <prefix>_<split>_karpathy.txt (header, `image,caption` lines) + flat images."""
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for i, caps in enumerate(captions):
        name = f"{1000 + i}.jpg"
        drawn_image(i, 24, i).save(root / image_dir / name, format="JPEG")
        lines += [f"{name},{c}" for c in caps]
    (root / f"{prefix}_{split}_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def coco_captions_json(captions: list[list[str]], prefix: str = "COCO_val2014_") -> dict:
    """A COCO-format captions document: images with ids and file names, one annotation per caption."""
    images = [{"id": 10 + i, "file_name": f"{prefix}{10 + i:012d}.jpg", "width": 24, "height": 24}
              for i in range(len(captions))]
    anns = [{"id": len(captions) * i + j, "image_id": 10 + i, "caption": c}
            for i, caps in enumerate(captions) for j, c in enumerate(caps)]
    return {"images": images, "annotations": anns}


def write_coco_images(folder: Path, doc: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(doc["images"]):
        drawn_image(i, 24, i).save(folder / im["file_name"], format="JPEG")


def write_coco_karpathy(root: Path, captions: list[list[str]], split: str = "test") -> Path:
    """CLIP_benchmark's MSCOCO layout: coco_<split>_karpathy.json (COCO format) + val2014/ images."""
    doc = coco_captions_json(captions)
    write_coco_images(root / "val2014", doc)
    (root / f"coco_{split}_karpathy.json").write_text(json.dumps(doc))
    return root


def write_coco_captions(root: Path, captions: list[list[str]], name: str = "val2017") -> Path:
    """COCO's own layout, as make-shards reads it: annotations/captions_<name>.json + <name>/ images."""
    doc = coco_captions_json(captions, prefix="")
    write_coco_images(root / name, doc)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{name}.json").write_text(json.dumps(doc))
    return root


def write_wds_captions(root: Path, captions: list[list[str]], shards: int = 2, split: str = "test") -> Path:
    """CLIP_benchmark's webdataset retrieval export: dataset_type.txt, <split>/{0..n-1}.tar of .webp + .txt lines."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    per = -(-len(captions) // shards)
    for s in range(shards):
        with tarfile.open(root / split / f"{s}.tar", "w") as tar:
            for i in range(s * per, min(len(captions), (s + 1) * per)):
                buf = io.BytesIO()
                drawn_image(i, 24, i).save(buf, format="WEBP", lossless=True)
                _add(tar, f"s{i:07d}.webp", buf.getvalue())
                _add(tar, f"s{i:07d}.txt", "\n".join(captions[i]).encode())
    (root / split / "nshards.txt").write_text(f"{shards}\n")
    return root


def write_wds_multilabel(root: Path, classnames: list[str], targets: list[list[int]], images: list | None = None,
                         split: str = "test") -> Path:
    """CLIP_benchmark's multi-label webdataset export: dataset_type.txt "multilabel", <key>.webp + <key>.npy 0/1."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "dataset_type.txt").write_text("multilabel\n")
    with tarfile.open(root / split / "0.tar", "w") as tar:
        for i, target in enumerate(targets):
            buf = io.BytesIO()
            (images[i] if images is not None else drawn_image(i, 24, i)).save(buf, format="WEBP", lossless=True)
            _add(tar, f"s{i:07d}.webp", buf.getvalue())
            npy = io.BytesIO()
            np.save(npy, np.asarray(target, dtype=np.int64))
            _add(tar, f"s{i:07d}.npy", npy.getvalue())
    (root / split / "nshards.txt").write_text("1\n")
    return root


# A model whose features are known: an image embeds as its mean RGB, a prompt naming a colour as that colour's axis.
PRIMARIES = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourClip(torch.nn.Module):
    """Images embed as their mean RGB; the prompt `template` of a colour embeds as that colour's unit vector."""

    def __init__(self, template: str = "a {} thing."):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))
        self.prompts = [template.format(c) for c in PRIMARIES]

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return torch.eye(3)[tokens[:, 0]]

    def tokenizer(self, texts):
        """Token ids for the model's prompts (the index of each prompt)."""
        return torch.tensor([[self.prompts.index(t)] for t in texts])


def write_wds_grouped(root: Path, classnames: list[str], templates: list[str], images: list[Image.Image],
                      labels: list[int], metadata: list[list[int]], shards: int = 2) -> Path:
    """DataComp's WILDS / fairness export: CLIP_benchmark's layout whose samples also carry <key>.npy, the row of
    metadata fields (int64), beside <key>.png and <key>.cls."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    per = -(-len(labels) // shards)
    for s in range(shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * per, min(len(labels), (s + 1) * per)):
                buf = io.BytesIO()
                images[i].save(buf, format="PNG")
                npy = io.BytesIO()
                np.save(npy, np.asarray(metadata[i], dtype=np.int64))
                _add(tar, f"s{i:06d}.png", buf.getvalue())
                _add(tar, f"s{i:06d}.cls", str(labels[i]).encode())
                _add(tar, f"s{i:06d}.npy", npy.getvalue())
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    return root


def write_winogavil(root: Path, instances: list[tuple[str, list[str], list[str], list[Image.Image]]]) -> Path:
    """WinoGAViL in our webdataset layout: per instance <key>.json (cue, candidates, associations) and <key>.<i>.png
    images."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for n, (cue, candidates, associations, images) in enumerate(instances):
            _add(tar, f"w{n:05d}.json", json.dumps({"cue": cue, "candidates": candidates,
                                                    "associations": associations}).encode())
            for i, im in enumerate(images):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                _add(tar, f"w{n:05d}.{i}.png", buf.getvalue())
    (root / "test" / "nshards.txt").write_text("1\n")
    return root


# nlphuji/winogavil's features as `datasets` writes them into a file's schema metadata (cue, lists of names, images)
WINOGAVIL_FEATURES = {"cue": {"dtype": "string", "_type": "Value"},
                      "candidates": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                      "associations": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                      "candidate_images": {"feature": {"_type": "Image"}, "_type": "Sequence"}}


def winogavil_table(instances: list[tuple[str, list[str], list[str], list[Image.Image | bytes]]],
                    drop: tuple[str, ...] = ()):
    """nlphuji/winogavil's rows as a pyarrow table in the `datasets` storage types: cue string, candidates and
    associations lists of strings, candidate_images a list of Image values, struct<bytes: binary, path: string>
    (images given as bytes are stored as they are); the columns in `drop` left out."""
    import pyarrow as pa

    def encoded(im: Image.Image | bytes) -> bytes:
        if isinstance(im, bytes):
            return im
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"cue": pa.array([c for c, *_ in instances], pa.string()),
               "candidates": pa.array([list(n) for _, n, _, _ in instances], pa.list_(pa.string())),
               "associations": pa.array([list(a) for _, _, a, _ in instances], pa.list_(pa.string())),
               "candidate_images": pa.array([[{"bytes": encoded(im), "path": f"{i}.png"} for i, im in enumerate(images)]
                                             for *_, images in instances], pa.list_(image))}
    table = pa.table({k: v for k, v in columns.items() if k not in drop})
    features = {k: v for k, v in WINOGAVIL_FEATURES.items() if k not in drop}
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def write_winogavil_parquet(root: Path, instances: list, files: int = 2, row_group_size: int = 2,
                            drop: tuple[str, ...] = ()) -> Path:
    """The hub's parquet files of nlphuji/winogavil's test split: <root>/data/test-0000i-of-0000n.parquet, each
    in row groups of `row_group_size` rows."""
    import pyarrow.parquet as pq

    table = winogavil_table(instances, drop)
    (root / "data").mkdir(parents=True, exist_ok=True)
    per = -(-len(instances) // files)
    for f in range(files):
        pq.write_table(table.slice(f * per, per), root / "data" / f"test-{f:05d}-of-{files:05d}.parquet",
                       row_group_size=row_group_size)
    return root


def write_winogavil_saved(root: Path, instances: list, files: int = 2, drop: tuple[str, ...] = ()) -> Path:
    """A `DatasetDict.save_to_disk` folder of nlphuji/winogavil's test split: <root>/test/data-0000i-of-0000n.arrow
    (Arrow IPC streams, as `datasets` writes them), dataset_info.json and state.json, beside dataset_dict.json."""
    import pyarrow as pa

    table = winogavil_table(instances, drop)
    folder = root / "test"
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(instances) // files)
    names = [f"data-{f:05d}-of-{files:05d}.arrow" for f in range(files)]
    for f, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(f * per, per), max_chunksize=2)
    (folder / "dataset_info.json").write_text(json.dumps({"features": WINOGAVIL_FEATURES}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": "test"}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    return root
