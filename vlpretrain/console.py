"""Console plumbing both scripts share (`vlpretrain`, `zeroshot`): a command registry, the parser, the error handler.

It sits below both packages' CLIs and imports neither, so `zeroshot` never loads the trainer to print a help text.
A command is a function that adds its arguments to its sub-parser and returns the function that runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlpretrain.errors import ConfigError, VLPretrainError

Runner = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Runner]


@dataclass
class Commands:
    """The subcommands of one console script, in registration order."""

    prog: str
    description: str
    entries: dict[str, tuple[str, Setup]] = field(default_factory=dict)

    def command(self, name: str, help: str) -> Callable[[Setup], Setup]:
        """Register a subcommand; the decorated function adds its arguments and returns its runner."""

        def wrap(fn: Setup) -> Setup:
            assert name not in self.entries, f"{self.prog} {name} registered twice"
            self.entries[name] = (help, fn)
            return fn

        return wrap

    def build_parser(self) -> argparse.ArgumentParser:
        """The argument parser with every registered subcommand."""
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        # the deepspeed launcher passes --local_rank before the subcommand; the environment carries it too
        parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for name, (help_, setup) in self.entries.items():
            sp = sub.add_parser(name, help=help_, description=help_)
            sp.set_defaults(_run=setup(sp))
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Parse `argv` and run the chosen subcommand through `run_command`."""
        # DeepSpeed's ZeRO internals call a collective torch has renamed; the warning is theirs, once per rank and run
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)
        return run_command(self.build_parser().parse_args(argv))


def format_bytes(n: int) -> str:
    """A byte count for people: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_writable(path: str | os.PathLike, option: str = "--out") -> None:
    """Fail now, in one line, when `path` could not be written once the work is done."""
    target = Path(path).expanduser()
    folder = target if target.is_dir() else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr in one write, so that the lines of several ranks sharing a terminal or a log never
    run into each other (print writes the text and its newline separately)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: a user error prints `error: ...` on one line and gives 2, Ctrl-C gives 130."""
    try:
        return int(args._run(args) or 0)
    except VLPretrainError as e:
        print_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
