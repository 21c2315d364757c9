"""Evaluators: what the trainer runs on its model during and after training, built by name from the config.

The trainer knows this protocol only. Implementations live in other packages and reach the registry without this
package importing them: an installed package declares factories in the `vlpretrain.evaluators` entry-point group
(zeroshot's setup.cfg entry: `zeroshot = zeroshot.training:ZeroShotEvaluator`), loaded the first time a config
asks for a name not registered yet; Python callers may `register_evaluator` their own, or hand factories to
`vlpretrain.train(cfg, evaluators={name: factory})`.

An evaluator is built from the run's config on every rank before training, so that a bad setting or a missing
benchmark folder fails before step 1; the trainer then runs it on rank 0 alone with a plain model holding the
consolidated weights, and keeps stop handling and the results file to itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Protocol

from torch import nn

from vlpretrain.config import RunConfig
from vlpretrain.errors import ConfigError
from vlpretrain.results import ResultEntry
from vlpretrain.stopping import StopCheck

ENTRY_POINT_GROUP = "vlpretrain.evaluators"


class Evaluator(Protocol):
    """One evaluation of a model. `should_stop` is asked between batches; a stop raises
    `vlpretrain.stopping.Interrupted`."""

    def run(self, model: nn.Module, should_stop: StopCheck) -> dict[str, dict[str, float]]:
        """Metrics during training: {name: {metric: value}}, as the metrics log takes them."""
        ...

    def planned(self) -> list[tuple[str, ...]]:
        """The (task, benchmark[, language]) of the entries `report` yields (English when no language is given):
        what a stop lists as not evaluated."""
        ...

    def report(self, model: nn.Module, should_stop: StopCheck) -> Iterator[tuple[str, ResultEntry]]:
        """The final evaluation, one results-file entry at a time with the name the metrics log shows it under."""
        ...


EvaluatorFactory = Callable[[RunConfig], Evaluator]

EVALUATORS: dict[str, EvaluatorFactory] = {}


def register_evaluator(name: str) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    """Decorator: make `factory` the evaluator called `name` (a second, different one is refused)."""
    def add(factory: EvaluatorFactory) -> EvaluatorFactory:
        assert EVALUATORS.get(name, factory) is factory, f"evaluator {name} registered twice"
        EVALUATORS[name] = factory
        return factory
    return add


def requested_evaluators(cfg: RunConfig) -> list[str]:
    """The evaluators `cfg` asks for by name: "zeroshot" when `eval.benchmarks` names any."""
    return ["zeroshot"] if cfg.eval.benchmarks else []


def _load_entry_points(names: list[str]) -> None:
    """Register the installed factories called `names` (importing only the packages that provide them)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in names and ep.name not in EVALUATORS:
            register_evaluator(ep.name)(ep.load())


def build_evaluators(cfg: RunConfig, given: Mapping[str, EvaluatorFactory] | None = None) -> list[Evaluator]:
    """The evaluators `cfg` asks for, built (each checks its settings and data now); from `given` when the caller
    hands factories in, else from the registry and the installed entry points."""
    names = requested_evaluators(cfg)
    if given is None:
        _load_entry_points([n for n in names if n not in EVALUATORS])
    factories = EVALUATORS if given is None else given
    missing = [n for n in names if n not in factories]
    if missing and given is not None:
        raise ConfigError(f"eval.benchmarks: needs the {missing[0]!r} evaluator, which is not among those handed "
                          f"to train ({', '.join(sorted(given)) or 'none'})")
    if missing:
        raise ConfigError(f"eval.benchmarks: needs the {missing[0]!r} evaluator, and none is installed (the "
                          f"zeroshot package provides it through the {ENTRY_POINT_GROUP!r} entry point: "
                          "reinstall with `make install` or `pip install -e .`)")
    return [factories[n](cfg) for n in names]
