"""The benchmarks: one registration each, naming its layouts and, where the CLIP paper differs, its metric.

Headline metrics follow the CLIP paper (appendix, table of datasets): mean per-class recall for FGVC Aircraft,
Oxford-IIIT Pets, Caltech-101 and Flowers-102; top-1 accuracy elsewhere. The paper scores VOC2007 by 11-point mAP
over whole images (multi-label): that is voc2007-multilabel (headline: CLIP_benchmark's mean average precision, the
11-point form reported beside it); voc2007 scores CLIP_benchmark's single-label crops of each annotated object by
mean per-class recall, which is less sensitive to VOC's many `person` crops. Every benchmark also reads
CLIP_benchmark's webdataset export (see wds.py); aliases are CLIP_benchmark's dataset names.
"""

from __future__ import annotations

from zeroshot.datasets.arrays import CifarLayout, IdxLayout
from zeroshot.datasets.base import Benchmark, register
from zeroshot.datasets.captions import CocoKarpathyLayout, FlickrLayout
from zeroshot.datasets.folder import FolderLayout
from zeroshot.datasets.multilingual import (
    XM3600_LANGUAGES,
    XTD_CODES,
    XTD_LANGUAGES,
    AnnotationsLayout,
    Crossmodal3600Layout,
    XtdLayout,
)
from zeroshot.datasets.scenes import (
    ClevrLayout,
    KittiLayout,
    VocCropsLayout,
    VocMultilabelLayout,
    clevr_count_label,
    clevr_distance_label,
)
from zeroshot.datasets.tvsets import TorchvisionLayout, tv

MPCR = "mean_per_class_recall"


def _tuple(m: str | tuple[str, ...]) -> tuple[str, ...]:
    return (m,) if isinstance(m, str) else m


def _tv(cls_name: str, test: str | tuple[str, ...], train: str | tuple[str, ...], needs: str | None = None,
        label_map: tuple[int, ...] | None = None, **kwargs) -> TorchvisionLayout:
    return TorchvisionLayout(tv(cls_name, **kwargs), {"test": _tuple(test), "train": _tuple(train)},
                             label_map=label_map, needs=needs)


def _same(*dirs: str) -> FolderLayout:
    """Datasets without an official split (evaluated whole, as CLIP_benchmark does): either split reads all."""
    return FolderLayout(test=dirs, train=dirs)


# ImageNet and its distribution shifts: class folders named by wnid (ImageNetV2: by class index).
register(Benchmark("imagenet1k", (FolderLayout(test=("val", ""), naming="asset"),), aliases=("imagenet",)))
register(Benchmark("imagenetv2", (FolderLayout(test=("imagenetv2-matched-frequency-format-val", ""), naming="asset",
                                               numeric=True),)))
register(Benchmark("imagenet-sketch", (FolderLayout(test=("sketch", ""), naming="asset"),), aliases=("imagenet_sketch",)))
register(Benchmark("imagenet-a", (FolderLayout(test=("imagenet-a", ""), naming="asset"),)))
register(Benchmark("imagenet-r", (FolderLayout(test=("imagenet-r", ""), naming="asset"),)))
register(Benchmark("objectnet", (FolderLayout(test=("objectnet-1.0/images", "images", ""), naming="asset"),)))

# Small natural-image sets read by our array parsers.
register(Benchmark("cifar10", (CifarLayout("cifar-10-batches-py", ("test_batch",),
                                           tuple(f"data_batch_{i}" for i in range(1, 6))),)))
register(Benchmark("cifar100", (CifarLayout("cifar-100-python", ("test",), ("train",)),)))
register(Benchmark("mnist", (IdxLayout("MNIST"),)))
register(Benchmark("fashion-mnist", (IdxLayout("FashionMNIST"),), aliases=("fashion_mnist", "fashionmnist")))

# Sets torchvision reads from their published archives.
register(Benchmark("stl10", (_tv("STL10", "stl10_binary/test_X.bin", "stl10_binary/train_X.bin"),)))
register(Benchmark("svhn", (_tv("SVHN", "test_32x32.mat", "train_32x32.mat", needs="scipy"),)))
register(Benchmark("food101", (_tv("Food101", "food-101/meta/test.json", "food-101/meta/train.json"),)))
register(Benchmark("flowers102", (_tv("Flowers102", "flowers-102/setid.mat", "flowers-102/setid.mat", needs="scipy"),),
                   metric=MPCR, aliases=("flowers",)))
register(Benchmark("dtd", (_tv("DTD", "dtd/dtd/labels/test1.txt", "dtd/dtd/labels/train1.txt"),)))
register(Benchmark("oxford-pets", (_tv("OxfordIIITPet", "oxford-iiit-pet/annotations/test.txt",
                                       "oxford-iiit-pet/annotations/trainval.txt", split_names={"train": "trainval"}),),
                   metric=MPCR, aliases=("pets",)))
register(Benchmark("stanford-cars", (_tv("StanfordCars", "stanford_cars/cars_test_annos_withlabels.mat",
                                         "stanford_cars/devkit/cars_train_annos.mat", needs="scipy"),),
                   aliases=("cars",)))
register(Benchmark("fgvc-aircraft", (_tv("FGVCAircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt",
                                         "fgvc-aircraft-2013b/data/images_variant_trainval.txt",
                                         split_names={"train": "trainval"}, annotation_level="variant"),),
                   metric=MPCR, aliases=("fgvc_aircraft",)))
register(Benchmark("sun397", (_tv("SUN397", "SUN397/ClassName.txt", "SUN397/ClassName.txt", has_split=False),)))
register(Benchmark("gtsrb", (_tv("GTSRB", "gtsrb/GT-final_test.csv", "gtsrb/GTSRB/Training"),)))
register(Benchmark("pcam", (_tv("PCAM", "pcam/camelyonpatch_level_2_split_test_x.h5",
                                "pcam/camelyonpatch_level_2_split_train_x.h5", needs="h5py"),)))
# torchvision numbers FER2013's emotions angry, disgust, fear, happy, sad, surprise, neutral; ours follow
# CLIP_benchmark's order (neutral before sad), which is also the Kaggle folders' sorted order.
register(Benchmark("fer2013", (
    _tv("FER2013", ("fer2013/fer2013.csv", "fer2013/icml_face_data.csv", "fer2013/test.csv"),
        ("fer2013/fer2013.csv", "fer2013/icml_face_data.csv", "fer2013/train.csv"), has_download=False,
        label_map=(0, 1, 2, 3, 5, 6, 4)),
    FolderLayout(test=("test", ""), naming="asset"))))

# Class-folder sets (torchvision's own readers for these are ImageFolders over the same trees).
register(Benchmark("caltech101", (_same("caltech101/101_ObjectCategories", "101_ObjectCategories", ""),), metric=MPCR))
register(Benchmark("eurosat", (FolderLayout(test=("eurosat/2750", "2750", ""), train=("eurosat/2750", "2750", ""),
                                            naming="asset"),)))
register(Benchmark("country211", (FolderLayout(test=("country211/test", "test", ""),
                                               train=("country211/train", "train")),)))
register(Benchmark("rendered-sst2", (FolderLayout(test=("rendered-sst2/test", "test", ""),
                                                  train=("rendered-sst2/train", "train")),), aliases=("renderedsst2",)))
register(Benchmark("resisc45", (_same("NWPU-RESISC45", ""),)))
register(Benchmark("birdsnap", (FolderLayout(test=("test", "")),)))

# VTAB's structured tasks and VOC crops: labels computed from annotations.
register(Benchmark("kitti-distance", (KittiLayout(),), aliases=("kitti_closest_vehicle_distance",)))
register(Benchmark("clevr-count", (ClevrLayout(clevr_count_label),), aliases=("clevr_count_all",)))
register(Benchmark("clevr-distance", (ClevrLayout(clevr_distance_label),), aliases=("clevr_closest_object_distance",)))
register(Benchmark("voc2007", (VocCropsLayout(),), metric=MPCR))
register(Benchmark("voc2007-multilabel", (VocMultilabelLayout(),), metric="mean_average_precision", task="multilabel",
                   aliases=("voc2007_multilabel",)))
register(Benchmark("imagenet-o", (FolderLayout(test=("imagenet-o", ""), naming="asset"),)))


# Class folders named by label index (0, 1, ...), as an image-folder export of a TFDS split writes them.
BY_LABEL = FolderLayout(test=("test", ""), train=("train",), naming="asset", numeric=True)


# The rest of VTAB as CLIP_benchmark evaluates it (its `vtab/<name>` datasets): TFDS-only sets, read from its
# webdataset export (wds_vtab-<name>) or from class folders named by label.
for name, alias in [("dmlab", "dmlab"), ("dsprites-orientation", "dsprites_label_orientation"),
                    ("dsprites-x-position", "dsprites_label_x_position"),
                    ("dsprites-y-position", "dsprites_label_y_position"),
                    ("smallnorb-azimuth", "smallnorb_label_azimuth"), ("smallnorb-elevation", "smallnorb_label_elevation"),
                    ("diabetic-retinopathy", "diabetic_retinopathy")]:
    register(Benchmark(name, (BY_LABEL,), aliases=(alias,), clip_benchmark=f"vtab/{alias}"))

# Image-text retrieval (the Karpathy test splits CLIP_benchmark evaluates), headline: the mean of the six recalls.
# Each also reads CLIP_benchmark's webdataset export, our own shards and a COCO captions json (captions.py).
KARPATHY = "CLIP_benchmark's Karpathy-split annotations (github.com/mehdidc/retrieval_annotations, release 1.0.0)"
register(Benchmark("flickr8k", (FlickrLayout("flickr8k"),), metric="mean_recall", task="retrieval",
                   notes=f"{KARPATHY}: flickr8k_test_karpathy.txt, 1000 images x 5 captions"))
register(Benchmark("flickr30k", (FlickrLayout("flickr30k"),), metric="mean_recall", task="retrieval",
                   notes=f"{KARPATHY}: flickr30k_test_karpathy.txt, 1000 images x 5 captions"))
register(Benchmark("mscoco", (CocoKarpathyLayout(),), metric="mean_recall", task="retrieval",
                   aliases=("mscoco_captions",), notes=f"{KARPATHY}: coco_test_karpathy.json, 5000 val2014 images"))
register(Benchmark("captions", metric="mean_recall", task="retrieval",
                   notes="your own captioned images: make-shards output, a COCO captions json or a CLIP_benchmark export"))

# Multilingual retrieval (multilingual.py), one caption per image in the language picked with `language`; read from
# CLIP_benchmark's annotation files or the sets' own files, and scored like the English sets.
register(Benchmark("crossmodal3600", (AnnotationsLayout("crossmodal3600_captions", "xm3600"), Crossmodal3600Layout()),
                   metric="mean_recall", task="retrieval", caption_languages=XM3600_LANGUAGES,
                   notes="Crossmodal-3600 (Thapliyal et al. 2022): 3600 images with captions in 36 languages; the "
                         "first caption of the language per image, as CLIP_benchmark's crossmodal3600.py takes it"))
register(Benchmark("xtd10", (AnnotationsLayout("xtd10", "xtd10", XTD_CODES), XtdLayout("xtd10")),
                   metric="mean_recall", task="retrieval", caption_languages=XTD_LANGUAGES,
                   notes="XTD10 (adobe-research/Cross-lingual-Test-Dataset-XTD10): 1000 COCO images, one caption each "
                         "in 11 languages (de/fr from MIC, ja from STAIR), as CLIP_benchmark's xtd10.py reads them"))
register(Benchmark("multilingual-mscoco", (AnnotationsLayout("multilingual_mscoco_captions", "multilingual_mscoco",
                                                             XTD_CODES), XtdLayout("multilingual_mscoco")),
                   metric="mean_recall", task="retrieval", caption_languages=XTD_LANGUAGES,
                   aliases=("multilingual_mscoco_captions",),
                   notes="CLIP_benchmark's multilingual_mscoco_captions: XTD10's 1000 COCO images and captions under "
                         "another name (its multilingual_mscoco.py)"))
