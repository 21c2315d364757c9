"""`vlpretrain` console script: parse, look up, call. Library functions take plain arguments, never this namespace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vlpretrain.errors import VLPretrainError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments and returns the runner."""

    def wrap(fn):
        def add(p: argparse.ArgumentParser) -> None:
            p.set_defaults(_run=fn(p))

        COMMANDS[name] = (help, add, fn)
        return fn

    return wrap


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; may be repeated")


@command("info", "print the resolved run config and model parameter counts")
def _info(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--no-model", action="store_true", help="skip building the model for parameter counts")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import dump_yaml, load_config

        cfg = load_config(a.config, a.overrides)
        print(f"# resolved config of {a.config}")
        print(dump_yaml(cfg), end="")
        if not a.no_model:
            from vlpretrain.models import build_model, count_parameters

            model = build_model(cfg.model)
            counts = count_parameters(model)
            print("# parameters")
            for k, v in counts.items():
                print(f"#   {k}: {v:,}")
        return 0

    return run


@command("upcycle", "turn a dense checkpoint into an MoE one whose experts copy its MLPs (model.moe of --config)")
def _upcycle(p: argparse.ArgumentParser):
    p.add_argument("--from", dest="source", required=True, metavar="DENSE",
                   help="dense checkpoint: an export of ours, or an open_clip .pt/.bin/.safetensors file")
    p.add_argument("--arch", help="architecture of an open_clip checkpoint (default: model.name of --config)")
    _config_args(p)
    p.add_argument("--out", required=True, metavar="MOE_CKPT", help="where to write the MoE export (.safetensors)")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import load_config
        from vlpretrain.errors import ConfigError
        from vlpretrain.models import count_parameters, read_export_config, upcycle

        cfg = load_config(a.config, a.overrides)
        if cfg.model.moe.num_experts < 1:
            raise ConfigError(f"{a.config}: model.moe.num_experts: must be >= 1 to upcycle")
        arch = a.arch
        if arch is None and read_export_config(a.source) is None:
            arch = cfg.model.name
        model = upcycle(a.source, cfg.model.moe, a.out, arch=arch, seed=cfg.train.seed)
        counts = count_parameters(model)
        print(f"wrote {a.out}: {counts['total']:,} parameters, {counts['active per token']:,} active per token")
        print(f"train it with: vlpretrain train --config {a.config} --set model.pretrained={a.out}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vlpretrain", description="Contrastive vision-language pretraining.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except VLPretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
