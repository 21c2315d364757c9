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


@command("train", "train a model from a run config (one process, torchrun or the deepspeed launcher)")
def _train(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--resume", metavar="latest|CKPT", help="continue from the run's latest checkpoint or a given one")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.config import load_config
        from vlpretrain.train import train

        summary = train(load_config(a.config, a.overrides), resume=a.resume)
        return 0 if not summary["interrupted"] else 130

    return run


@command("export", "write a consolidated safetensors model from a checkpoint of any ZeRO stage")
def _export(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("out", help="output .safetensors file")

    def run(a: argparse.Namespace) -> int:
        from vlpretrain.engine import export_checkpoint

        print(export_checkpoint(a.checkpoint, a.out))
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vlpretrain", description="Contrastive vision-language pretraining.")
    # the deepspeed launcher passes --local_rank before the subcommand; the environment carries it too
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
