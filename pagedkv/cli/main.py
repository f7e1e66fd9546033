"""`pagedkv` command line: a small dispatcher over subcommands.

Each subcommand lives in its own module that exposes

    add_parser(subparsers) -> argparse.ArgumentParser   # registers its options
    run(args: argparse.Namespace) -> int                # does the work, returns the exit code

and is listed in `SUBCOMMANDS`. Modules import their heavy dependencies inside `run`, so
`pagedkv --help` stays fast and never needs torch.

Errors a user can fix (a bad option, a malformed trace line) print one line,
`pagedkv <command>: error: <message>`, and exit with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# subcommand modules, in the order `--help` lists them
SUBCOMMANDS: tuple[str, ...] = (
    "pagedkv.cli.demo",
    "pagedkv.cli.simulate",
    "pagedkv.cli.serve",
    "pagedkv.cli.route",
)

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (`prog: error: message (see --help)`)
    instead of a usage dump followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = OneLineParser(
        prog="pagedkv",
        description="pagedkv: block-paged KV cache, session-pinning scheduler and "
        "prefix cache for LLM inference servers.",
    )
    subparsers = parser.add_subparsers(
        title="commands", metavar="<command>", dest="command", parser_class=OneLineParser
    )
    for name in SUBCOMMANDS:
        module = importlib.import_module(name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedkv` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if extra:  # reported by the subcommand, whose options they were probably meant for
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"pagedkv {args.command}"
    try:
        code: int = run(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
