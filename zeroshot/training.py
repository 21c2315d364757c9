"""The trainer's "zeroshot" evaluator (`vlpretrain.evaluation`): the benchmarks of `eval.benchmarks` under
`eval.root`, zero-shot in each of `eval.languages` during training, plus linear probes (`eval.linear_probe`) in
the final report.

setup.cfg declares it in the `vlpretrain.evaluators` entry-point group, so the trainer finds it without importing
zeroshot. It only evaluates the model it is given; the trainer decides when, on which rank, and writes the results.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from vlpretrain.config import RunConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models import get_tokenizer
from vlpretrain.results import ResultEntry
from vlpretrain.stopping import StopCheck
from zeroshot.datasets import get_benchmark
from zeroshot.evaluate import entry_task, evaluate_suite
from zeroshot.probe import linear_probe


class ZeroShotEvaluator:
    """Zero-shot metrics of the configured benchmarks in each of `eval.languages` (and linear probes at the end,
    when configured; they read no text, so once per benchmark).

    Built before training: every benchmark name is looked up in every language and its data found under
    `eval.root` (the train split too for linear probes), so a typo, a language a benchmark lacks or a missing
    folder fails before step 1. The metrics log names English results by the benchmark (`fashion-mnist`), others
    with their language (`fashion-mnist/de`); results-file entries carry the language.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg, e = cfg, cfg.eval
        if not e.root:
            raise ConfigError("eval.root: required when eval.benchmarks is set")
        splits = ("test", "train") if e.linear_probe else ("test",)
        self.benchmarks = []
        for name in e.benchmarks:
            self.benchmarks.append(get_benchmark(name))
            for language in e.languages:
                get_benchmark(name, language)
            for split in splits:
                self.benchmarks[-1].locate(e.root, split=split)

    def _zeroshot(self, model: nn.Module, names: list[str], language: str,
                  should_stop: StopCheck) -> list[ResultEntry]:
        e = self.cfg.eval
        return evaluate_suite(model, names, e.root, tokenizer=get_tokenizer(self.cfg.model), batch_size=e.batch_size,
                              workers=e.workers, max_images=e.max_images, progress=True, should_stop=should_stop,
                              language=language)

    @staticmethod
    def _name(entry: ResultEntry) -> str:
        return entry.benchmark if entry.language == "en" else f"{entry.benchmark}/{entry.language}"

    def run(self, model: nn.Module, should_stop: StopCheck) -> dict[str, dict[str, float]]:
        names = [b.name for b in self.benchmarks]
        return {self._name(entry): entry.metrics for language in self.cfg.eval.languages
                for entry in self._zeroshot(model, names, language, should_stop)}

    def planned(self) -> list[tuple[str, ...]]:
        e = self.cfg.eval
        probes = [("linear_probe", b.name) for b in self.benchmarks] if e.linear_probe else []
        return [(entry_task(b), b.name, get_benchmark(b.name, language).language)
                for b in self.benchmarks for language in e.languages] + probes

    def report(self, model: nn.Module, should_stop: StopCheck) -> Iterator[tuple[str, ResultEntry]]:
        e = self.cfg.eval
        for bench in self.benchmarks:
            for language in e.languages:
                (entry,) = self._zeroshot(model, [bench.name], language, should_stop)
                yield self._name(entry), entry
        for bench in self.benchmarks if e.linear_probe else []:
            m = linear_probe(model, bench.name, e.root, batch_size=e.batch_size, workers=e.workers,
                             max_images=e.max_images, progress=True, should_stop=should_stop)
            yield f"{bench.name}/linear_probe", ResultEntry("linear_probe", bench.name, bench.metric, m, str(e.root))
