"""How hpi commands print: rich tables at a fixed width, or one JSON document on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any


def console(width: int = 160):
    """A rich console at a fixed width, so that tables read the same in a terminal, a pipe and a test."""
    from rich.console import Console

    return Console(width=width)


def say_command(console, text: str) -> None:
    """A line that ends in a command for the user to copy: never wrapped by rich (the terminal may fold it, a
    copy keeps it whole), no markup or highlighting read into its brackets and paths."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def json_default(o: Any):
    """numpy scalars as plain numbers; anything else that JSON cannot encode is an error."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot encode {type(o).__name__}")


def emit_json(doc: Any) -> None:
    """One JSON document, one line, on stdout."""
    sys.stdout.write(json.dumps(doc, default=json_default) + "\n")
