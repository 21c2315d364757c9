"""The evaluator protocol: evaluators built by name from the config, handed in or found through the installed
`vlpretrain.evaluators` entry point (zeroshot's), and one line when none is there; make-shards' class names by
benchmark through `vlpretrain.class_names`."""

import configparser
import importlib

import numpy as np
import pytest
from helpers import REPO, write_idx

from vlpretrain.config import load_config
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.evaluation import ENTRY_POINT_GROUP, build_evaluators, requested_evaluators


def config(*overrides):
    return load_config(None, ["data.train=unused", *overrides])


def test_the_config_names_the_evaluators():
    assert requested_evaluators(config()) == []
    assert requested_evaluators(config("eval.benchmarks=[mnist]", f"eval.root={REPO}")) == ["zeroshot"]
    assert build_evaluators(config(), given={}) == []


def test_handed_in_factories_are_built_from_the_config():
    built = []
    cfg = config("eval.benchmarks=[mnist]", f"eval.root={REPO}")
    evaluators = build_evaluators(cfg, given={"zeroshot": lambda c: built.append(c) or "evaluator"})
    assert evaluators == ["evaluator"] and built == [cfg]


def test_a_missing_evaluator_is_one_config_error():
    with pytest.raises(ConfigError, match="eval.benchmarks: needs the 'zeroshot' evaluator"):
        build_evaluators(config("eval.benchmarks=[mnist]", f"eval.root={REPO}"), given={})


def test_setup_cfg_declares_zeroshots_entry_points():
    """What `pip install -e .` (make install) registers; each names an object that exists."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = {group: setup["options.entry_points"][group].split()
                for group in (ENTRY_POINT_GROUP, "vlpretrain.class_names")}
    assert declared == {ENTRY_POINT_GROUP: ["zeroshot", "=", "zeroshot.training:ZeroShotEvaluator"],
                        "vlpretrain.class_names": ["zeroshot", "=", "zeroshot.datasets:class_names"]}
    for _, _, target in declared.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_the_installed_entry_point_builds_zeroshots_evaluator(tmp_path):
    """The trainer's path: no evaluators handed in, the installed metadata names zeroshot's (a stale install
    fails here: reinstall with `make install`)."""
    from zeroshot.training import ZeroShotEvaluator

    with pytest.raises(ConfigError, match="eval.root: required"):
        build_evaluators(config("eval.benchmarks=[mnist]"))
    with pytest.raises(ConfigError, match="unknown benchmark 'mnsit'"):
        build_evaluators(config("eval.benchmarks=[mnsit]", f"eval.root={tmp_path}"))
    with pytest.raises(DataError, match="mnist"):  # its data is looked for now, not after training
        build_evaluators(config("eval.benchmarks=[mnist]", f"eval.root={tmp_path}"))
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    (evaluator,) = build_evaluators(config("eval.benchmarks=[mnist]", f"eval.root={tmp_path}"))
    assert isinstance(evaluator, ZeroShotEvaluator) and evaluator.planned() == [("zeroshot", "mnist", "en")]


def test_make_shards_classes_by_benchmark_name_through_the_entry_point():
    from vlpretrain.cli import _class_names

    assert _class_names("fashion-mnist")[:2] == ["T-shirt/top", "Trouser"]
    with pytest.raises(ConfigError, match="--classes nope: neither a class names file nor a benchmark name"):
        _class_names("nope")
