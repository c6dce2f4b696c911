"""``hpi``: plan, predict and explain big-model inference on hardware it does not fit; run, tune and probe.

The parser is assembled from one module per command family (``COMMAND_MODULES``). Each has
``register(sub) -> {name: handler}``: it adds its parsers to ``sub`` (argparse sub-parsers) and returns
its handlers, each ``handler(args) -> int``. Importing a command module must stay cheap and must not import
torch, the executor's launcher or optuna (``hpi plan`` starts in under a second): handlers import what they
need when they run.

Every user mistake ends in one line on stderr and exit code 2, never a traceback; an hpi bug in one line
that names the log file holding its traceback, exit code 1 (``hpi.cli.errors``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Callable, Sequence

from hpi.cli.args import Parser
from hpi.cli.errors import report
from hpi.processes import exit_code, signal_of, sigterm_as_interrupt

# In the order ``hpi --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "hpi.cli.plan",  # plan, predict, explain
    "hpi.cli.presets",  # presets, config
    "hpi.cli.run",  # run
    "hpi.cli.serve",  # serve, chat
    "hpi.cli.catalog",  # models, hardware
    "hpi.cli.probe",  # probe, check
    "hpi.cli.calibrate",  # calibrate, validate
    "hpi.cli.autotune",  # autotune
    "hpi.cli.evaluate",  # eval
)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer its pipe closed on


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
    """Run one ``hpi`` command; every failure ends in one line on stderr (``hpi.cli.errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM stops any command the way Ctrl-C does (one line, exit 143), wherever it arrives: commands that watch
    # ranks or trials install their own handlers while they do
    with sigterm_as_interrupt():
        return _run(argv)


def _run(argv: list[str]) -> int:
    prog = "hpi"
    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        prog = f"hpi {args.command}"
        return handlers[args.command](args)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{prog}: {'terminated by SIGTERM' if signal_of(e) == signal.SIGTERM else 'interrupted'}\n")
        return exit_code(e)
    except SystemExit:  # --help, --version
        raise
    except BrokenPipeError:  # the reader went away (hpi plan | head): nothing to say, as a killed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return EXIT_BROKEN_PIPE
    except Exception as e:
        return report(e, prog, argv)
