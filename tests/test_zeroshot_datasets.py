"""The benchmark registry and every loader family, on fake data written in each exact on-disk format."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import (
    drawn_image,
    mnist_arrays,
    write_cifar,
    write_clevr,
    write_folder_tree,
    write_idx,
    write_kitti,
    write_voc,
    write_wds,
)

from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import read_idx
from zeroshot.datasets import get_benchmark, list_benchmarks
from zeroshot.datasets.scenes import clevr_distance_label, kitti_distance_label

REQUIRED = ["imagenet1k", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r", "objectnet", "cifar10",
            "cifar100", "mnist", "fashion-mnist", "stl10", "svhn", "food101", "flowers102", "dtd", "oxford-pets",
            "stanford-cars", "fgvc-aircraft", "sun397", "caltech101", "eurosat", "gtsrb", "country211",
            "rendered-sst2", "pcam", "fer2013", "resisc45", "kitti-distance", "clevr-count", "clevr-distance",
            "voc2007", "birdsnap"]


def labels_of(evalset) -> list[int]:
    return [evalset.dataset[i][1] for i in range(len(evalset))]


def test_registry_covers_the_published_suite_with_data_and_loaders():
    names = [b.name for b in list_benchmarks()]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert set(REQUIRED) <= set(names)
    for b in list_benchmarks():
        if b.from_export:  # DataComp's WILDS and fairness sets: prompts only from the export, as DataComp reads them
            assert b.formats == ("wds",) and "classnames.txt" in b.sources["classnames"], b.name
            assert not b.classnames and not b.templates, b.name
            continue
        assert b.classnames and all(isinstance(c, str) for c in b.classnames), b.name
        assert b.templates and all("{c}" in t for t in b.templates), b.name
        assert b.formats[-1] == "wds" and len(b.formats) >= 2, b.name  # its own layout plus CLIP_benchmark's
        assert "classnames" in b.sources and "templates" in b.sources, b.name
        if b.folders is not None:
            assert len(b.folders) == len(b.classnames) == len(set(b.folders)), b.name


def test_registry_class_counts_and_metrics_follow_the_papers():
    expected = {"imagenet1k": 1000, "imagenet-a": 200, "imagenet-r": 200, "objectnet": 113, "cifar100": 100,
                "food101": 101, "flowers102": 102, "dtd": 47, "oxford-pets": 37, "stanford-cars": 196,
                "fgvc-aircraft": 100, "sun397": 397, "caltech101": 102, "gtsrb": 43, "country211": 211, "fer2013": 7,
                "resisc45": 45, "kitti-distance": 4, "clevr-count": 8, "clevr-distance": 6, "voc2007": 20,
                "birdsnap": 500}
    assert {n: len(get_benchmark(n).classnames) for n in expected} == expected
    per_class = {b.name for b in list_benchmarks() if b.metric == "mean_per_class_recall"}
    assert per_class == {"fgvc-aircraft", "oxford-pets", "caltech101", "flowers102"}  # voc2007: top-1, as DataComp
    assert get_benchmark("imagenet1k").templates[0] == "a bad photo of a {c}."
    assert len(get_benchmark("imagenet1k").templates) == 80
    # ImageNet-A's first wnid is n01498041 (stingray) in ILSVRC order
    assert get_benchmark("imagenet-a").folders[0] == "n01498041" and get_benchmark("imagenet-a").classnames[0] == "stingray"


def test_aliases_and_unknown_names():
    assert get_benchmark("pets").name == "oxford-pets"
    assert get_benchmark("clevr_count_all").name == "clevr-count"
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


def test_cifar10_and_cifar100_pickle_batches(tmp_path):
    images = write_cifar(tmp_path / "cifar-10-batches-py", [3, 1, 4, 1, 5], "test_batch")
    ds = get_benchmark("cifar10").load(tmp_path)
    assert ds.format == "torchvision" and len(ds) == 5 and labels_of(ds) == [3, 1, 4, 1, 5]
    assert np.array_equal(np.asarray(ds.dataset[2][0]), images[2])  # planes decoded back into the same pixels
    write_cifar(tmp_path / "c100" / "cifar-100-python", [99, 0], "test", key="fine_labels")
    assert labels_of(get_benchmark("cifar100").load(tmp_path / "c100")) == [99, 0]
    # the inner folder given as the root works too
    assert len(get_benchmark("cifar10").load(tmp_path / "cifar-10-batches-py")) == 5


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        get_benchmark("cifar10").load(tmp_path)


@pytest.mark.parametrize("where", ["", "raw", "FashionMNIST/raw"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_files_gz_or_not_flat_or_torchvision(tmp_path, where, suffix):
    labels = [7, 2, 1, 0, 9]
    arr = mnist_arrays(labels)
    write_idx(tmp_path / where / f"t10k-images-idx3-ubyte{suffix}", arr)
    write_idx(tmp_path / where / f"t10k-labels-idx1-ubyte{suffix}", np.array(labels, dtype=np.uint8))
    ds = get_benchmark("fashion-mnist").load(tmp_path)
    assert labels_of(ds) == labels
    image = ds.dataset[3][0]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], arr[3])


def test_idx_reader_checks_the_header(tmp_path):
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + b"\x01\x02")
    with pytest.raises(DataError, match="header says \\[9\\] values"):
        read_idx(bad)
    assert read_idx(write_idx(tmp_path / "ok.gz", np.arange(6, dtype=np.uint8).reshape(2, 3))).tolist() == [[0, 1, 2],
                                                                                                          [3, 4, 5]]


def test_incomplete_mnist_names_the_missing_file(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", mnist_arrays([1]))
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        get_benchmark("mnist").load(tmp_path)


def test_imagenet_wnid_folders_map_to_ilsvrc_indices(tmp_path):
    bench = get_benchmark("imagenet1k")
    wnids = [bench.folders[0], bench.folders[417], bench.folders[999]]
    write_folder_tree(tmp_path / "val", wnids, per_class=2)
    ds = bench.load(tmp_path)
    assert ds.format == "imagefolder" and sorted(labels_of(ds)) == [0, 0, 417, 417, 999, 999]
    # ImageNet-R: the same wnid layout, labels index its 200-class subset
    r = get_benchmark("imagenet-r")
    write_folder_tree(tmp_path / "r" / "imagenet-r", [r.folders[5]], per_class=1)
    assert labels_of(r.load(tmp_path / "r")) == [5]


def test_imagenetv2_numeric_folders_and_unknown_folder_message(tmp_path):
    write_folder_tree(tmp_path / "v2", ["0", "10", "999"], per_class=1)
    assert sorted(labels_of(get_benchmark("imagenetv2").load(tmp_path / "v2"))) == [0, 10, 999]
    write_folder_tree(tmp_path / "bad" / "val", [get_benchmark("imagenet1k").folders[0], "holiday_pics"], 1)
    with pytest.raises(DataError, match="folder 'holiday_pics' is not a imagenet1k class folder"):
        get_benchmark("imagenet1k").load(tmp_path / "bad")


def test_sorted_class_folders_and_count_check(tmp_path):
    write_folder_tree(tmp_path / "test", ["negative", "positive"], per_class=3, ext=".png")
    ds = get_benchmark("rendered-sst2").load(tmp_path)
    assert labels_of(ds) == [0, 0, 0, 1, 1, 1]
    write_folder_tree(tmp_path / "r45", ["airplane", "airport"], per_class=1)
    with pytest.raises(DataError, match="found 2 class folders, resisc45 has 45 classes"):
        get_benchmark("resisc45").load(tmp_path / "r45")


def test_fer2013_kaggle_folders_follow_the_benchmark_order(tmp_path):
    write_folder_tree(tmp_path / "test", ["neutral", "sad", "angry"], per_class=1)
    ds = get_benchmark("fer2013").load(tmp_path)
    names = get_benchmark("fer2013").classnames
    assert [names[y] for y in sorted(labels_of(ds))] == ["angry", "neutral", "sad"]


def test_clip_benchmark_webdataset_layout(tmp_path):
    labels = [0, 1, 2, 1, 0, 2, 2]
    write_wds(tmp_path / "stl10", ["plane", "bird", "car"], labels, templates=["a {c} here."], shards=3)
    ds = get_benchmark("stl10").load(tmp_path)  # found as the stl10 sub-folder of a collection root
    assert ds.format == "wds" and ds.root == tmp_path / "stl10"
    assert ds.classnames == ["plane", "bird", "car"] and ds.templates == ["a {c} here."]  # the files win
    assert labels_of(ds) == labels
    image, _ = ds.dataset[4]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(drawn_image(0, 24, 4), dtype=int)).mean() < 8  # webp
    # without nshards.txt or templates: every *.tar in name order, the registry's templates
    write_wds(tmp_path / "b", ["x", "y"], [1, 0], shards=1, ext="png", nshards_file=False)
    ds = get_benchmark("pcam").load(tmp_path / "b")
    assert labels_of(ds) == [1, 0] and ds.templates == get_benchmark("pcam").templates


def test_webdataset_incomplete_and_bad_samples(tmp_path):
    (tmp_path / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"incomplete CLIP_benchmark webdataset for cifar10; missing .*test/\*\.tar"):
        get_benchmark("cifar10").load(tmp_path)
    write_wds(tmp_path / "w", ["a", "b"], [0, 5], shards=1)
    with pytest.raises(DataError, match="label 5 is outside the 2 classes"):
        get_benchmark("cifar10").load(tmp_path / "w")


def test_missing_root_gives_one_line_naming_expected_files(tmp_path):
    with pytest.raises(DataError) as e:
        get_benchmark("cifar10").load(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "does not exist" in msg
    assert "cifar-10-batches-py/{test_batch}" in msg and "classnames.txt and test/*.tar" in msg
    with pytest.raises(DataError, match=r"no food101 test data found; expected \[torchvision\] food-101/meta/test.json") as e:
        get_benchmark("food101").load(tmp_path)
    assert str(e.value).endswith("(there, or in a food101/ sub-folder)")


def test_forced_format(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [1], "test_batch")
    with pytest.raises(DataError, match="no cifar10 test data found; expected \\[wds\\]"):
        get_benchmark("cifar10").load(tmp_path, format="wds")
    with pytest.raises(ConfigError, match="cannot be read as 'imagefolder'"):
        get_benchmark("cifar10").load(tmp_path, format="imagefolder")


def write_dtd(root, classes, per_class=1):
    """torchvision's DTD layout: dtd/dtd/images/<class>/*.jpg listed in dtd/dtd/labels/{train,val,test}1.txt."""
    base = root / "dtd" / "dtd"
    lines = []
    for i, cls in enumerate(classes):
        (base / "images" / cls).mkdir(parents=True)
        for j in range(per_class):
            drawn_image(i, 16, j).save(base / "images" / cls / f"{cls}_{j}.jpg")
            lines.append(f"{cls}/{cls}_{j}.jpg")
    (base / "labels").mkdir()
    for split in ("train", "val", "test"):
        (base / "labels" / f"{split}1.txt").write_text("\n".join(reversed(lines)) + "\n")


def test_torchvision_reader_dtd(tmp_path):
    classes = [c.replace(" ", "-") for c in get_benchmark("dtd").classnames]  # folder names are the class names
    write_dtd(tmp_path, classes)
    ds = get_benchmark("dtd").load(tmp_path)
    assert ds.format == "torchvision" and sorted(labels_of(ds)) == list(range(47))
    assert ds.dataset[0][1] == 46 and ds.dataset[0][0].mode == "RGB"  # test1.txt lists zigzagged first here
    write_dtd(tmp_path / "two", ["banded", "zigzagged"])
    with pytest.raises(DataError, match="torchvision found 2 dtd classes, the benchmark has 47"):
        get_benchmark("dtd").load(tmp_path / "two")


def test_clevr_scenes_give_vtab_labels(tmp_path):
    write_clevr(tmp_path, [[9.2, 12.0, 8.1], [7.0] * 10, [10.5, 11.0, 30.0, 14.0]])
    assert labels_of(get_benchmark("clevr-count").load(tmp_path)) == [0, 7, 1]
    assert labels_of(get_benchmark("clevr-distance").load(tmp_path)) == [1, 0, 5]
    assert clevr_distance_label([{"pixel_coords": [0, 0, 8.5]}]) == 1  # bins are (lo, hi]
    assert clevr_distance_label([{"pixel_coords": [0, 0, 8.51]}]) == 2


def test_kitti_closest_vehicle_distance(tmp_path):
    write_kitti(tmp_path, [[("Car", 25.0), ("Van", 12.0)], [("Pedestrian", 3.0)], [("Truck", 5.0)],
                           [("Cyclist", 4.0), ("Car", 40.0)]])
    assert labels_of(get_benchmark("kitti-distance").load(tmp_path)) == [1, 3, 0, 2]
    assert kitti_distance_label([]) == 3


def test_voc2007_crops_one_sample_per_object(tmp_path):
    write_voc(tmp_path, {"000001": [("dog", (4, 6, 30, 40)), ("person", (0, 0, 10, 10))], "000004": [("tvmonitor",
                                                                                                   (1, 2, 3, 4))]})
    ds = get_benchmark("voc2007").load(tmp_path)
    names = get_benchmark("voc2007").classnames
    assert [names[y] for y in labels_of(ds)] == ["dog", "person", "tvmonitor"]
    assert ds.dataset[0][0].size == (26, 34)


def test_transform_is_applied(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [2, 3], "test_batch")
    ds = get_benchmark("cifar10").load(tmp_path, transform=lambda im: torch.full((1,), float(im.size[0])))
    assert ds.dataset[1] == (torch.tensor([32.0]), 3)


def test_assets_are_plain_json_with_sources():
    from zeroshot.datasets.base import ASSETS

    files = sorted(ASSETS.glob("*.json"))
    assert len(files) >= 33
    for f in files:
        doc = json.loads(f.read_text())
        assert ("templates" in doc or doc.get("from_export")) and ("sources" in doc or "source" in doc), f.name
