"""The ``hpi`` command line: one module per command family, each thin (parse, resolve, call, print).

``hpi.cli.args`` holds the flags the commands share and turns them into typed data; ``hpi.cli.app`` builds
the parser and owns the one error path. New command families register in ``hpi.cli.app.COMMAND_MODULES``.
"""

from hpi.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
