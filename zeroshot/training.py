"""The trainer's "zeroshot" evaluator (`vlpretrain.evaluation`): the benchmarks of `eval.benchmarks` under
`eval.root`, zero-shot during training, plus linear probes (`eval.linear_probe`) in the final report.

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
    """Zero-shot metrics of the configured benchmarks (and linear probes at the end, when configured).

    Built before training: every benchmark name is looked up and its data found under `eval.root` (the train
    split too for linear probes), so a typo or a missing folder fails before step 1.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg, e = cfg, cfg.eval
        if not e.root:
            raise ConfigError("eval.root: required when eval.benchmarks is set")
        splits = ("test", "train") if e.linear_probe else ("test",)
        self.benchmarks = []
        for name in e.benchmarks:
            self.benchmarks.append(get_benchmark(name))
            for split in splits:
                self.benchmarks[-1].locate(e.root, split=split)

    def _zeroshot(self, model: nn.Module, names: list[str], should_stop: StopCheck) -> list[ResultEntry]:
        e = self.cfg.eval
        return evaluate_suite(model, names, e.root, tokenizer=get_tokenizer(self.cfg.model), batch_size=e.batch_size,
                              workers=e.workers, max_images=e.max_images, progress=True, should_stop=should_stop)

    def run(self, model: nn.Module, should_stop: StopCheck) -> dict[str, dict[str, float]]:
        return {entry.benchmark: entry.metrics for entry in
                self._zeroshot(model, [b.name for b in self.benchmarks], should_stop)}

    def planned(self) -> list[tuple[str, str]]:
        probes = [("linear_probe", b.name) for b in self.benchmarks] if self.cfg.eval.linear_probe else []
        return [(entry_task(b), b.name) for b in self.benchmarks] + probes

    def report(self, model: nn.Module, should_stop: StopCheck) -> Iterator[tuple[str, ResultEntry]]:
        e = self.cfg.eval
        for bench in self.benchmarks:
            (entry,) = self._zeroshot(model, [bench.name], should_stop)
            yield entry.benchmark, entry
        for bench in self.benchmarks if e.linear_probe else []:
            m = linear_probe(model, bench.name, e.root, batch_size=e.batch_size, workers=e.workers,
                             max_images=e.max_images, progress=True, should_stop=should_stop)
            yield f"{bench.name}/linear_probe", ResultEntry("linear_probe", bench.name, bench.metric, m, str(e.root))
