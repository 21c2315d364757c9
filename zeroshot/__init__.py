"""Zero-shot evaluation of CLIP-style models: prompt-ensemble heads, a 30+ benchmark registry, metrics, reports.

    import zeroshot
    probs = zeroshot.classify(model, images, ["cat", "dog"])                      # your own labels
    metrics = zeroshot.evaluate(model, "cifar10", "/data/cifar10")              # a registered benchmark
    metrics = zeroshot.evaluate(model, "fashion-mnist", root, language="de")    # its German prompts
    bench = zeroshot.get_benchmark("imagenet1k", language="zh")                # bench.classnames, bench.templates
    entries = zeroshot.evaluate_suite(model, ["cifar10", "mnist"], "/data")       # one sub-folder each
    zeroshot.update_results("results.json", "ViT-B-32", None, entries)          # see zeroshot/results.py
    probe = zeroshot.linear_probe(model, "cifar10", "/data/cifar10")            # CLIP-protocol linear probe
    recall = zeroshot.retrieval(model, "flickr30k", "/data/flickr30k")          # image-text recall@1/5/10
    wino = zeroshot.evaluate(model, "winoground", "/data/winoground")           # text, image, group scores
    mine = zeroshot.evaluate(model, "cifar10", "/data", classnames="names.txt") # your prompts (zeroshot.prompts)
    tuned = zeroshot.adapt(model, "cifar10", "/data/cifar10", shots=4)          # few-shot learned prompts
    texts = zeroshot.caption(coca_model, ["a.jpg", "b.jpg"])                   # CoCa captions (beam search)
    scores = zeroshot.captioning(coca_model, "mscoco", "/data/mscoco")         # BLEU-4, ROUGE-L, CIDEr, METEOR
    run = zeroshot.run_suite(model, "datacomp", "/data/datacomp")              # DataComp's 38 tasks and its score
"""

from zeroshot.adapters import Adapter
from zeroshot.caption_scorers import caption_metrics
from zeroshot.captioning import Generation, caption, caption_benchmark, captioning, names_class_rate
from zeroshot.classifier import DEFAULT_TEMPLATES, build_classifier, classify, encode_texts
from zeroshot.datasets import Benchmark, get_benchmark, list_benchmarks
from zeroshot.evaluate import evaluate, evaluate_suite, run_zeroshot
from zeroshot.features import encode_images
from zeroshot.fewshot import AdaptConfig, AdaptResult, adapt, adapt_head
from zeroshot.metrics import (
    caption_selection_metrics,
    classification_metrics,
    mean_per_class_recall,
    multilabel_metrics,
    retrieval_metrics,
    top_k_accuracy,
)
from zeroshot.probe import linear_probe
from zeroshot.prompts import CustomPrompts, read_prompts
from zeroshot.results import ResultEntry, Results, read_results, update_results, write_results
from zeroshot.retrieve import retrieval
from zeroshot.suites import SuiteScore, get_suite, run_suite, score_suite

__all__ = [
    "DEFAULT_TEMPLATES", "AdaptConfig", "AdaptResult", "Adapter", "Benchmark", "CustomPrompts", "Generation",
    "ResultEntry", "Results", "SuiteScore", "adapt", "adapt_head", "build_classifier", "caption", "caption_benchmark",
    "caption_metrics", "caption_selection_metrics", "captioning", "classification_metrics", "classify",
    "encode_images", "encode_texts", "evaluate", "evaluate_suite", "get_benchmark", "get_suite", "linear_probe",
    "list_benchmarks", "mean_per_class_recall", "multilabel_metrics", "names_class_rate", "read_prompts",
    "read_results", "retrieval", "retrieval_metrics", "run_suite", "run_zeroshot", "score_suite", "top_k_accuracy",
    "update_results", "write_results",
]
