"""``hpi``: plan, predict and explain big-model inference on hardware it does not fit; run, tune and probe.

The parser is assembled from one module per command family (``COMMAND_MODULES``). Each has
``register(sub) -> {name: handler}``: it adds its parsers to ``sub`` (argparse sub-parsers) and returns
its handlers, each ``handler(args) -> int``. Importing a command module must stay cheap and must not import
torch, the executor's launcher or optuna (``hpi plan`` starts in under a second): handlers import what they
need when they run.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from hpi.cli.args import EXIT_USAGE, Parser, UsageError

# In the order ``hpi --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "hpi.cli.plan",  # plan, predict, explain
    "hpi.cli.run",  # run
    "hpi.cli.serve",  # serve, chat
    "hpi.cli.catalog",  # models, hardware
    "hpi.cli.probe",  # probe, check
    "hpi.cli.calibrate",  # calibrate, validate
    "hpi.cli.autotune",  # autotune
)
EXIT_INTERRUPTED = 130


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The ``hpi`` parser and its handlers by command name."""
    from hpi import __version__

    parser = Parser(prog="hpi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for module in COMMAND_MODULES:
        handlers.update(importlib.import_module(module).register(sub))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    from hpi.planner.catalog import ModelConfigError
    from hpi.planner.profiles import ProfileError

    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        return handlers[args.command](args)
    except (UsageError, ModelConfigError, ProfileError, ValueError) as e:
        message = str(e)
        sys.stderr.write(message if message.startswith("hpi") else f"hpi: error: {message}")
        sys.stderr.write("\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("hpi: interrupted\n")
        return EXIT_INTERRUPTED
