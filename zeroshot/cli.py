"""`zeroshot` console script: list | eval | probe | adapt | caption | caption-eval | report | export-results. Parse,
look up, call; subcommands register with @command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlpretrain.console import Commands, check_writable
from vlpretrain.errors import ConfigError, VLPretrainError
from vlpretrain.stopping import Interrupted, StopRequest

COMMANDS = Commands("zeroshot", "Zero-shot evaluation of CLIP-style models.")
command = COMMANDS.command


@command("list", "list the benchmarks by task: classes, templates, headline metric, readable formats")
def _list(p: argparse.ArgumentParser):
    p.add_argument("--sources", action="store_true", help="also print where class names and templates come from")
    p.add_argument("--language", help="only the benchmarks that have this language (ISO 639-1 code, e.g. de, zh), "
                                      "with its class names, templates and sources")
    p.add_argument("--languages", action="store_true", help="also print the languages each benchmark has")

    def run(a: argparse.Namespace) -> int:
        from zeroshot.datasets import TASKS, list_benchmarks
        from zeroshot.datasets.base import LANGUAGE_ALIASES

        benches = list_benchmarks(None)
        if a.language:
            language = LANGUAGE_ALIASES.get(a.language, a.language)
            benches = [b.in_language(language) for b in benches if language in b.languages]
            if not benches:
                known = sorted({lang for b in list_benchmarks(None) for lang in b.languages})
                raise ConfigError(f"--language: no benchmark has {a.language!r}; languages: {', '.join(known)}")
        width = max(len(b.name) for b in benches)
        print(f"{'benchmark':<{width}}  classes  templates  {'metric':<22}  formats")
        for task in TASKS:  # one group per task, under a heading naming it
            group = [b for b in benches if b.task == task]
            if not group and a.language:
                continue
            print(f"[task: {task}, {len(group)} benchmarks" + (f" in {group[0].language}]" if a.language else "]"))
            for b in group:
                counts = f"{len(b.classnames):>7}  {len(b.templates):>9}" if b.classnames else f"{'-':>7}  {'-':>9}"
                print(f"{b.name:<{width}}  {counts}  {b.metric:<22}  {', '.join(b.formats)}")
                if a.languages:
                    print(f"{'':<{width}}    languages ({len(b.languages)}): {', '.join(b.languages)}")
                if a.sources:
                    for what, src in b.sources.items():
                        print(f"{'':<{width}}    {what}: {src}")
        per_task = ", ".join(f"{sum(b.task == t for b in benches)} {t}" for t in TASKS)
        print(f"{per_task}: {len(benches)} benchmarks" + (f" in {benches[0].language}" if a.language else ""))
        return 0

    return run


def _model_and_tokenizer(model_arg: str, pretrained: str | None):
    """Load the model; its tokenizer by architecture name when that is known, else open_clip's default."""
    from vlpretrain.models import get_tokenizer, load_model, read_export_config

    model = load_model(model_arg, pretrained)
    cfg = read_export_config(model_arg)
    try:
        tokenizer = get_tokenizer(cfg.name if cfg is not None else model_arg)
    except VLPretrainError:
        tokenizer = None  # a checkpoint of an unknown architecture: fall back to the default BPE tokenizer
    return model, tokenizer


def _model_and_data_args(p: argparse.ArgumentParser, out_help: str, suites: bool = False) -> None:
    """The options `eval` and `probe` share: which model, which benchmarks where, and how to run (with `suites`,
    a named suite may stand for the benchmarks)."""
    p.add_argument("--model", required=True, help="exported checkpoint (.safetensors) or open_clip architecture name")
    p.add_argument("--pretrained", help="local weights for an architecture name (open_clip or ours)")
    which = p.add_mutually_exclusive_group(required=True) if suites else p
    which.add_argument("--benchmark", required=not suites, help="comma-separated benchmark names (see `zeroshot list`)")
    if suites:
        from zeroshot.suites import suite_names

        which.add_argument("--suite", choices=suite_names(),
                           help="a named collection found under --root (DataComp's wds_<task>_test folders too): "
                                "every task found is evaluated, the missing ones listed, the suite's score printed "
                                "and written to --out")
    p.add_argument("--root", required=True,
                   help="folder with one sub-folder per benchmark, or the benchmark's own folder for one benchmark")
    p.add_argument("--out", help=out_help)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--format", help="force a data layout (torchvision, imagefolder, wds) instead of detecting it")
    p.add_argument("--language", help="class names and templates (retrieval: captions) in this language, an ISO "
                                      "639-1 code such as de, fr, zh, ja (default: en; see `zeroshot list --languages`)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, one line per step in a log)")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    """--classnames and --templates (eval, adapt): your own prompts instead of the benchmarks' (zeroshot.prompts)."""
    p.add_argument("--classnames", metavar="FILE",
                   help="class names replacing the benchmarks' own: JSON keyed by benchmark, or one name a line")
    p.add_argument("--templates", metavar="FILE",
                   help="templates with {c} (or class-specific prompts) replacing the benchmarks' own: JSON keyed by "
                        "benchmark, or one template a line; `cupl`: CuPL's ImageNet prompts as CLIP_benchmark ships")


def _checked_benchmarks(a: argparse.Namespace, split: str) -> list[str]:
    """The --benchmark names, each found under --root (and --out writable, --classnames / --templates / --recall-k
    valid), so that unknown names, bad files, missing data and an unwritable output fail before the model loads."""
    from zeroshot.datasets import get_benchmark

    if a.out:
        check_writable(a.out)
    if getattr(a, "save", None):
        check_writable(a.save, "--save")
    names = [n.strip() for n in a.benchmark.split(",") if n.strip()]
    if not names:
        raise ConfigError("--benchmark: give at least one benchmark name")
    if getattr(a, "recall_k", None) is not None:
        from zeroshot.retrieve import check_ks

        check_ks(a.recall_k)
    if getattr(a, "classnames", None) or getattr(a, "templates", None):
        from zeroshot.prompts import read_prompts

        # a bad prompts file fails before any data is scanned; say which benchmarks take the files
        for name, origin in read_prompts(names, a.classnames, a.templates).origin.items():
            print(f"{name}: {origin}", flush=True)
    if not Path(a.root).is_dir():
        raise ConfigError(f"--root: {a.root} is not a folder")
    for name in names:
        get_benchmark(name, a.language).locate(a.root, split=split, format=a.format)
    return names


def _save(a: argparse.Namespace, entries: list, not_evaluated: list[tuple[str, ...]] | None = None,
          suites: dict | None = None) -> int:
    """Add the entries to the --out results file, when one is given (eval and probe write the same file shape), or
    with --results-format clip_benchmark write CLIP_benchmark's files into the --out folder. `not_evaluated` marks
    our results file interrupted (CLIP_benchmark's files have no place for it)."""
    from zeroshot.results import Results, update_results, write_clip_benchmark

    if a.out and getattr(a, "results_format", "zeroshot") == "clip_benchmark":
        paths = write_clip_benchmark(Results(a.model, a.pretrained, entries), a.out)
        print(f"wrote {len(paths)} CLIP_benchmark result files to {a.out}")
    elif a.out:
        update_results(a.out, a.model, a.pretrained, entries, not_evaluated=not_evaluated, suites=suites)
        print(f"wrote {a.out}")
    return 0


def _label(x) -> str:
    """A benchmark (or results entry) as printed: its name, with its language when that is not English."""
    name = getattr(x, "benchmark", None) or x.name
    return name if x.language == "en" else f"{name} [{x.language}]"


def _device(a: argparse.Namespace):
    from zeroshot.features import resolve_device

    return resolve_device(a.device)


@command("eval", "zero-shot evaluation of a model on benchmarks (classification, retrieval or caption selection)")
def _eval(p: argparse.ArgumentParser):
    _model_and_data_args(p, "results JSON to write or update (a folder with --results-format clip_benchmark)",
                         suites=True)
    p.add_argument("--results-format", choices=("zeroshot", "clip_benchmark"), default="zeroshot",
                   help="zeroshot: one results file (default); clip_benchmark: its JSON per benchmark into --out")
    p.add_argument("--max-images", type=int, help="evaluate an evenly spaced subset of this many images")
    p.add_argument("--cache-dir", help="folder caching zero-shot heads between runs")
    p.add_argument("--adapter", help="adapter file from `zeroshot adapt`: classify with the adapted head instead of "
                                     "the prompt ensemble (one benchmark, the adapter's)")
    _prompt_args(p)
    p.add_argument("--recall-k", type=int, nargs="+", metavar="K",
                   help="retrieval: the k of recall@k, e.g. --recall-k 1 5 10 50 (default: 1 5 10)")
    p.add_argument("--overlap-with", metavar="SHARDS",
                   help="also report accuracy on the test images that have a near duplicate in these training "
                        "shards (a folder or pattern) and on the clean rest (CLIP paper, section 5)")
    p.add_argument("--overlap-threshold", type=float,
                   help="thumbnail cosine at or above which a training image duplicates a test image "
                        "(default 0.99, as curate's --decontam-threshold)")
    p.add_argument("--overlap-cache", help="cache of the shards' thumbnails (default: ~/.cache/vlpretrain/curation)")

    def run(a: argparse.Namespace) -> int:
        from zeroshot.datasets import get_benchmark
        from zeroshot.evaluate import entry_task, evaluate_suite
        from zeroshot.results import ResultEntry

        if a.suite:
            if a.adapter:
                raise ConfigError("--adapter: an adapter belongs to one benchmark; give --benchmark, not --suite")
            return _eval_suite(a)
        names = _checked_benchmarks(a, "test")
        if a.overlap_with and a.adapter:
            raise ConfigError("--overlap-with and --adapter: give one of them")

        def show(e: ResultEntry) -> None:
            _show_entry(e)
            if "overlap_top1" in e.metrics:
                m = e.metrics
                print(f"{_label(e)}: overlap with {a.overlap_with}: {int(m['overlap_images'])} test images "
                      f"({100 * m['overlap_fraction']:.2f}%) top1={m['overlap_top1']:.4f}; clean "
                      f"{int(m['clean_images'])} top1={m['clean_top1']:.4f}", flush=True)

        if a.adapter:
            show(entry := _eval_adapter(a, names))
            return _save(a, [entry])
        model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
        entries: list[ResultEntry] = []

        def keep(e: ResultEntry) -> None:
            entries.append(e)
            show(e)

        stop = StopRequest()  # Ctrl-C or SIGTERM: stop at the next batch and keep what finished
        try:
            if a.overlap_with:
                from zeroshot.overlap import evaluate_overlap

                for name in names:
                    keep(evaluate_overlap(model, name, a.root, a.overlap_with, tokenizer=tokenizer,
                                          threshold=a.overlap_threshold, batch_size=a.batch_size, workers=a.workers,
                                          device=_device(a), max_images=a.max_images, format=a.format,
                                          progress=not a.no_progress, cache_dir=a.cache_dir,
                                          overlap_cache=a.overlap_cache, should_stop=lambda: stop.requested))
                return _save(a, entries)
            evaluate_suite(model, names, a.root, tokenizer=tokenizer, batch_size=a.batch_size, workers=a.workers,
                           device=_device(a), max_images=a.max_images, format=a.format, progress=not a.no_progress,
                           cache_dir=a.cache_dir, on_result=keep, should_stop=lambda: stop.requested,
                           language=a.language, classnames=a.classnames, templates=a.templates,
                           recall_ks=a.recall_k)
        except Interrupted:
            left = [(entry_task(b), b.name, b.language) for b in (get_benchmark(n, a.language)
                                                                   for n in names[len(entries):])]
            print(f"interrupted: {len(entries)} of {len(names)} benchmarks evaluated"
                  + (f"; {a.out} lists the others as not evaluated" if a.out else ""), file=sys.stderr, flush=True)
            _save(a, entries, not_evaluated=left)
            return 130
        finally:
            stop.restore()
        return _save(a, entries)

    return run


def _show_entry(e) -> None:
    """One line per evaluated benchmark: the headline first under its own name (`headline` is only a copy of it),
    then the other metrics."""
    others = "  ".join(f"{k}={v:.4f}" for k, v in e.metrics.items() if k not in ("headline", "images", e.metric))
    print(f"{_label(e)}: {e.metric}={e.headline:.4f}  {others}  images={int(e.metrics['images'])}  "
          f"({e.format} at {e.root})", flush=True)


def _eval_suite(a: argparse.Namespace) -> int:
    """`zeroshot eval --suite NAME`: every task of the suite found under --root, the missing ones listed, then the
    suite's score (DataComp's: the mean of its 38 main metrics, named for how many it covers) printed and written."""
    from zeroshot.datasets import get_benchmark
    from zeroshot.evaluate import entry_task, evaluate_suite
    from zeroshot.results import ResultEntry
    from zeroshot.suites import format_score, get_suite, locate_suite, score_suite

    if a.out:
        check_writable(a.out)
    if not Path(a.root).is_dir():
        raise ConfigError(f"--root: {a.root} is not a folder")
    suite = get_suite(a.suite)
    found, not_found = locate_suite(suite, a.root, a.format)
    for name, why in not_found.items():
        print(f"missing: {name} ({why})", flush=True)
    if not found:
        raise ConfigError(f"--root: none of the {len(suite.tasks)} {suite.name} tasks is under {a.root}")
    print(f"{suite.name}: {len(found)} of {len(suite.tasks)} tasks found under {a.root}", flush=True)
    entries: list[ResultEntry] = []

    def keep(e: ResultEntry) -> None:
        entries.append(e)
        _show_entry(e)

    model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
    stop = StopRequest()  # Ctrl-C or SIGTERM: stop at the next batch and keep what finished
    try:
        evaluate_suite(model, found, a.root, tokenizer=tokenizer, batch_size=a.batch_size, workers=a.workers,
                       device=_device(a), max_images=a.max_images, format=a.format, progress=not a.no_progress,
                       cache_dir=a.cache_dir, on_result=keep, should_stop=lambda: stop.requested,
                       classnames=a.classnames, templates=a.templates, recall_ks=a.recall_k)
    except Interrupted:
        left = [(entry_task(get_benchmark(n)), get_benchmark(n).name) for n in found[len(entries):]]
        print(f"interrupted: {len(entries)} of {len(found)} found tasks evaluated; no suite score",
              file=sys.stderr, flush=True)
        _save(a, entries, not_evaluated=left)
        return 130
    finally:
        stop.restore()
    score = score_suite(suite, entries)
    print(format_score(score), flush=True)
    return _save(a, entries, suites={suite.name: score.as_dict()})


@command("probe", "linear-probe benchmarking on frozen image features (CLIP protocol)")
def _probe(p: argparse.ArgumentParser):
    _model_and_data_args(p, "results JSON to write or update (task linear_probe)")
    p.add_argument("--shots", type=int, help="training images per class (few-shot); default: all")
    p.add_argument("--l2", type=float, help="fixed L2 strength; default: swept on a validation split of train")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and few-shot sampling")
    p.add_argument("--max-images", type=int, help="cap each split at this many evenly spaced images")
    p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/vlpretrain/features)")

    def run(a: argparse.Namespace) -> int:
        from zeroshot.datasets import get_benchmark
        from zeroshot.probe import linear_probe
        from zeroshot.results import ResultEntry

        names = _checked_benchmarks(a, "train")
        model, _ = _model_and_tokenizer(a.model, a.pretrained)
        entries = []
        for name in names:
            bench = get_benchmark(name, a.language)
            m = linear_probe(model, name, a.root, shots=a.shots, l2=a.l2, seed=a.seed, batch_size=a.batch_size,
                             workers=a.workers, device=_device(a), max_images=a.max_images, format=a.format,
                             cache_dir=a.cache_dir, progress=not a.no_progress, language=a.language)
            print(f"{_label(bench)}: linear probe {bench.metric}={m['headline']:.4f}  top1={m['top1']:.4f}  "
                  f"l2={m['l2']:.3g}  train={int(m['num_train'])}  test={int(m['images'])}", flush=True)
            entries.append(ResultEntry("linear_probe", bench.name, bench.metric, m, str(a.root), a.format,
                                       language=bench.language))
        return _save(a, entries)

    return run


def _eval_adapter(a: argparse.Namespace, names: list[str]):
    """The results entry of the adapted head of `--adapter` on its benchmark's test split."""
    from vlpretrain.errors import CheckpointError
    from vlpretrain.models import image_transform
    from zeroshot.adapters import Adapter
    from zeroshot.datasets import get_benchmark
    from zeroshot.features import encode_images, spread_subset
    from zeroshot.fewshot import adapt_head, task_name
    from zeroshot.metrics import classification_metrics
    from zeroshot.results import ResultEntry

    adapter = Adapter.load(a.adapter)
    bench = get_benchmark(names[0], adapter.language)
    if len(names) != 1 or bench.name != adapter.benchmark:
        raise CheckpointError(f"{a.adapter}: adapter is for benchmark {adapter.benchmark}, not {','.join(names)}")
    if a.language and get_benchmark(names[0], a.language).language != adapter.language:
        raise CheckpointError(f"{a.adapter}: adapter was fitted on {adapter.language} prompts, not {a.language} "
                              f"(leave --language out to use the adapter's)")
    model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
    device = _device(a)
    model.to(device)
    head = adapt_head(model, adapter, tokenizer=tokenizer, source=a.adapter, classnames=a.classnames,
                      templates=a.templates)
    data = bench.load(a.root, split="test", transform=image_transform(model, train=False), format=a.format)
    feats, labels = encode_images(model, spread_subset(data.dataset, a.max_images), batch_size=a.batch_size,
                                  workers=a.workers, device=device, progress=not a.no_progress, desc=bench.name)
    scale = model.logit_scale.detach().exp().float().reshape(()).cpu()
    metrics = classification_metrics(adapter.logits(feats, head.cpu(), scale), labels, headline=bench.metric)
    if "shots" in adapter.info:
        metrics["shots"] = float(adapter.info["shots"])
    return ResultEntry(task_name(adapter.method), bench.name, bench.metric, metrics, str(data.root), data.format,
                       language=bench.language)


@command("adapt", "few-shot adaptation of a zero-shot head: learned prompts, (IA)^3 vectors, a Tip-Adapter "
                  "cache or a zero-shot-initialised linear head, towers frozen")
def _adapt(p: argparse.ArgumentParser):
    from zeroshot.fewshot import DEFAULT_AUGMENT, DEFAULT_LR, AdaptConfig

    d = AdaptConfig()
    _model_and_data_args(p, "results JSON to write or update (task adapt_prompt, adapt_ia3, adapt_tip or "
                            "adapt_linear)")
    p.add_argument("--method", choices=("prompt", "ia3", "tip", "linear"), default="prompt",
                   help="prompt: learned context offsets; ia3: learned key/value/MLP scales; tip: Tip-Adapter cache "
                        "of the shots' features, alpha and beta by leave-one-out; linear: the head itself, from the "
                        "zero-shot head, pulled towards it by --l2 (default: prompt)")
    p.add_argument("--augment", type=int,
                   help="random-resized-crop views per shot added to the training rows of prompt, ia3 and linear "
                        f"(default: {DEFAULT_AUGMENT['linear']} for linear, 0 for the others)")
    p.add_argument("--augment-scale", type=float, default=d.augment_scale,
                   help=f"smallest share of an image's area a view keeps (default: {d.augment_scale})")
    p.add_argument("--augment-flip", action="store_true", help="also flip views left-right (not for digits, text)")
    p.add_argument("--l2", type=float, help="linear: strength of the pull towards the zero-shot head (inf: stay "
                                            "there; default: cross-validated over the shots, CLAP's at one shot)")
    p.add_argument("--shots", type=int, default=16, help="training images per class (default: 16)")
    p.add_argument("--save", help="write the learned vectors here (safetensors), for `zeroshot eval --adapter`")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"most training steps; linear: most L-BFGS iterations per fit (default: {d.steps})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default: {DEFAULT_LR['prompt']} for prompt, "
                                            f"{DEFAULT_LR['ia3']} for ia3)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"decay of the learned change towards the zero-shot head (default: {d.weight_decay})")
    p.add_argument("--n-ctx", type=int, default=d.n_ctx,
                   help=f"prompt: context tokens with learned offsets (default: {d.n_ctx})")
    p.add_argument("--class-specific", action="store_true", help="prompt: one context per class and template")
    p.add_argument("--train-batch", type=int, default=d.batch_size,
                   help=f"training images per step (default: {d.batch_size})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of the shots held out for early stopping; 0: off (default: {d.val_fraction})")
    p.add_argument("--seed", type=int, default=0, help="seed of the shots, the held-out part and the batches")
    p.add_argument("--max-images", type=int, help="cap each split at this many evenly spaced images")
    p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/vlpretrain/features)")
    _prompt_args(p)

    def run(a: argparse.Namespace) -> int:
        from zeroshot.datasets import get_benchmark
        from zeroshot.fewshot import adapt
        from zeroshot.results import ResultEntry

        names = _checked_benchmarks(a, "train")
        if len(names) != 1:
            raise ConfigError("--benchmark: adapt fits one benchmark at a time (an adapter belongs to one)")
        cfg = AdaptConfig(steps=a.steps, lr=a.lr, weight_decay=a.weight_decay, n_ctx=a.n_ctx,
                          class_specific=a.class_specific, batch_size=a.train_batch, val_fraction=a.val_fraction,
                          augment=a.augment, augment_scale=a.augment_scale, augment_flip=a.augment_flip, l2=a.l2)
        model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
        bench = get_benchmark(names[0], a.language)
        result = adapt(model, bench.name, a.root, shots=a.shots, method=a.method, config=cfg, tokenizer=tokenizer,
                       seed=a.seed, batch_size=a.batch_size, workers=a.workers, device=_device(a),
                       max_images=a.max_images, format=a.format, cache_dir=a.cache_dir, language=bench.language,
                       classnames=a.classnames, templates=a.templates)
        m = result.metrics
        print(f"{_label(bench)}: {result.task} {bench.metric}={m['headline']:.4f}  top1={m['top1']:.4f}  "
              f"shots={int(m['shots'])}  steps={int(m['steps'])}  test={int(m['images'])}", flush=True)
        if a.save:
            print(f"wrote {result.adapter.save(a.save)}")
        return _save(a, [ResultEntry(result.task, bench.name, bench.metric, m, str(a.root), a.format,
                                     language=bench.language)])

    return run


def _generation_args(p: argparse.ArgumentParser) -> None:
    """The options of CoCa caption generation (open_clip's generate, with its defaults)."""
    from zeroshot.captioning import GENERATION_TYPES, Generation

    d = Generation()
    p.add_argument("--generation-type", choices=GENERATION_TYPES, default=d.generation_type,
                   help=f"beam search or sampling from the top-k / top-p tokens (default: {d.generation_type})")
    p.add_argument("--num-beams", type=int, default=d.num_beams, help=f"beam_search: beams (default: {d.num_beams})")
    p.add_argument("--num-beam-groups", type=int, default=d.num_beam_groups,
                   help=f"beam_search: diverse groups the beams form (default: {d.num_beam_groups})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top_k: tokens sampled from (default: {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p,
                   help=f"top_p: probability mass sampled from (default: {d.top_p})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default: 1)")
    p.add_argument("--seq-len", type=int, help="most tokens per caption, start and end included "
                                               "(default: 30, or the model's context length when shorter)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")


def _generation(a: argparse.Namespace):
    from zeroshot.captioning import Generation

    return Generation(generation_type=a.generation_type, seq_len=a.seq_len, num_beams=a.num_beams,
                      num_beam_groups=a.num_beam_groups, top_k=a.top_k, top_p=a.top_p, temperature=a.temperature)


def _image_files(paths: list[str]) -> list[Path]:
    """The image files named, each folder replaced by the images under it (sorted)."""
    from vlpretrain.errors import DataError
    from zeroshot.datasets.common import list_images

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DataError(f"{path}: no image files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    return files


@command("caption", "caption image files or folders, or a benchmark's test images, with a CoCa model")
def _caption(p: argparse.ArgumentParser):
    p.add_argument("images", nargs="*", help="image files or folders of images (or --benchmark and --root)")
    p.add_argument("--model", required=True, help="exported CoCa checkpoint (.safetensors) or architecture name")
    p.add_argument("--pretrained", help="local weights for an architecture name (open_clip or ours)")
    p.add_argument("--benchmark", help="caption this classification benchmark's test images instead (with --root), "
                                       "printing each one's class and how often the captions name it")
    p.add_argument("--root", help="--benchmark: folder with the benchmark (or one sub-folder per benchmark)")
    p.add_argument("--max-images", type=int, help="--benchmark: an evenly spaced subset of this many test images")
    p.add_argument("--format", help="--benchmark: force a data layout (torchvision, imagefolder, wds)")
    p.add_argument("--output", help="write the captions as JSON here instead of printing one line per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    _generation_args(p)

    def run(a: argparse.Namespace) -> int:
        import dataclasses

        generation = _generation(a)
        if bool(a.images) == bool(a.benchmark):
            raise ConfigError("caption: give image files or folders, or --benchmark NAME --root FOLDER (not both)")
        if a.output:
            check_writable(a.output, "--output")
        doc = {"model": a.model, "pretrained": a.pretrained, "generation": dataclasses.asdict(generation),
               "seed": a.seed}
        if a.benchmark:
            return _caption_benchmark(a, generation, doc)
        if a.root or a.max_images is not None or a.format:
            raise ConfigError("--root, --max-images and --format go with --benchmark")
        from zeroshot.captioning import caption

        files = _image_files(a.images)
        model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
        texts = caption(model, files, tokenizer=tokenizer, batch_size=a.batch_size, device=_device(a), seed=a.seed,
                        **dataclasses.asdict(generation))
        if not a.output:
            for path, text in zip(files, texts, strict=True):
                print(f"{path}\t{text}")
            return 0
        _write_json(a.output, {**doc, "captions": {str(path): text for path, text in zip(files, texts, strict=True)}})
        print(f"wrote {len(texts)} captions to {a.output}")
        return 0

    return run


def _caption_benchmark(a: argparse.Namespace, generation, doc: dict) -> int:
    """`zeroshot caption --benchmark`: print `index<TAB>class<TAB>caption` per test image and the names-class rate
    against chance, or write them all as JSON to --output."""
    import dataclasses

    from zeroshot.captioning import caption_benchmark
    from zeroshot.datasets import get_benchmark

    if not a.root:
        raise ConfigError("--benchmark: give --root, the folder holding the benchmark")
    if "," in a.benchmark:
        raise ConfigError("--benchmark: caption one benchmark at a time")
    bench = get_benchmark(a.benchmark.strip())
    if bench.task != "classification":
        raise ConfigError(f"--benchmark: {bench.name} is a {bench.task} benchmark; caption --benchmark needs a "
                          "classification set (captioned sets: zeroshot caption-eval)")
    (name,) = _checked_benchmarks(argparse.Namespace(benchmark=bench.name, root=a.root, format=a.format, out=None,
                                                       language=None),
                                  "test")
    model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
    found = caption_benchmark(model, name, a.root, tokenizer=tokenizer, batch_size=a.batch_size, device=_device(a),
                              max_images=a.max_images, format=a.format, seed=a.seed, **dataclasses.asdict(generation))
    summary = (f"{found.benchmark}: captions name the image's class for {found.names_class:.1%} of "
               f"{len(found.captions)} test images (chance {found.chance:.0%})")
    if not a.output:
        for i, label, text in zip(found.indices, found.labels, found.captions, strict=True):
            print(f"{i}\t{found.classnames[label]}\t{text}")
        print(summary)
        return 0
    _write_json(a.output, {**doc, "benchmark": found.benchmark, "root": str(a.root),
                           "names_class": found.names_class, "chance": found.chance, "images": len(found.captions),
                           "captions": [{"index": i, "class": found.classnames[label], "caption": text}
                                        for i, label, text in zip(found.indices, found.labels, found.captions,
                                                                  strict=True)]})
    print(summary)
    print(f"wrote {len(found.captions)} captions to {a.output}")
    return 0


def _write_json(path: str, doc: dict) -> None:
    """Write `doc` as JSON at `path`, atomically: a crash never leaves a half file under the name."""
    import json
    import os

    out = Path(path)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)


@command("caption-eval", "captioning metrics of a CoCa model on captioned benchmarks (BLEU-4, ROUGE-L, CIDEr, METEOR)")
def _caption_eval(p: argparse.ArgumentParser):
    _model_and_data_args(p, "results JSON to write or update (task captioning)")
    p.set_defaults(batch_size=32)
    p.add_argument("--max-images", type=int, help="caption an evenly spaced subset of this many images")
    p.add_argument("--no-meteor", action="store_true",
                   help="leave METEOR out (with Java it is computed; its scorer takes some 20 s to start)")
    _generation_args(p)

    def run(a: argparse.Namespace) -> int:
        import dataclasses

        from zeroshot.caption_scorers import left_out
        from zeroshot.captioning import captioning
        from zeroshot.datasets import get_benchmark
        from zeroshot.results import ResultEntry

        generation = _generation(a)
        names = _checked_benchmarks(a, "test")
        for name in names:
            if get_benchmark(name).task != "retrieval":
                raise ConfigError(f"--benchmark: {name} is a {get_benchmark(name).task} benchmark; captioning needs a "
                                  "captioned set (flickr8k, flickr30k, mscoco or captions)")
        model, tokenizer = _model_and_tokenizer(a.model, a.pretrained)
        entries = []
        for name in names:
            bench = get_benchmark(name)
            root, layout = bench.locate(a.root, format=a.format)
            m = captioning(model, name, a.root, tokenizer=tokenizer, batch_size=a.batch_size, workers=a.workers,
                           device=_device(a), max_images=a.max_images, format=a.format, progress=not a.no_progress,
                           seed=a.seed, meteor=False if a.no_meteor else None, **dataclasses.asdict(generation))
            others = "  ".join(f"{k}={v:.4f}" for k, v in m.items() if k not in ("headline", "images", "cider"))
            print(f"{bench.name}: cider={m['cider']:.4f}  {others}  images={int(m['images'])}  "
                  f"({layout.name} at {root})", flush=True)
            entries.append(ResultEntry("captioning", bench.name, "cider", m, str(root), layout.name))
        print("left out: " + "; ".join(f"{k} ({why})" for k, why in left_out(False if a.no_meteor else None).items()))
        return _save(a, entries)

    return run


@command("report", "compare results files: a markdown table and a bar chart")
def _report(p: argparse.ArgumentParser):
    p.add_argument("results", nargs="+", help="results JSON files written by `zeroshot eval` (or the trainer)")
    p.add_argument("--out", required=True, help="folder for report.md and report.png")

    def run(a: argparse.Namespace) -> int:
        from zeroshot.report import write_report

        md, png = write_report(a.results, a.out)
        print(md.read_text(), end="")
        print(f"wrote {md} and {png}")
        return 0

    return run


@command("export-results", "write a results file's entries as CLIP_benchmark result files (one per benchmark)")
def _export_results(p: argparse.ArgumentParser):
    p.add_argument("results", help="results JSON written by `zeroshot eval` / `zeroshot probe` (or the trainer)")
    p.add_argument("--out", required=True, help="folder for the CLIP_benchmark JSON files")

    def run(a: argparse.Namespace) -> int:
        from zeroshot.results import read_results, write_clip_benchmark

        paths = write_clip_benchmark(read_results(a.results), a.out)
        for path in paths:
            print(f"wrote {path}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    return COMMANDS.build_parser()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line `error: ...` and exit 2, without a traceback."""
    return COMMANDS.main(argv)


if __name__ == "__main__":
    sys.exit(main())
