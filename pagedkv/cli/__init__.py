"""pagedkv.cli: the `pagedkv` command (`demo`, `serve`, `simulate`).

The only layer that reads argv or prints for a person; each subcommand is a module
with `add_parser(subparsers)` and `run(args) -> int`, dispatched by `main`.
"""

from __future__ import annotations

from pagedkv.cli.main import EXIT_USAGE, UsageError, main

__all__ = ["EXIT_USAGE", "UsageError", "main"]
