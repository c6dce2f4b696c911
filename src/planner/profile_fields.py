"""Reading typed fields out of a parsed hardware profile: sections, strings, counts and quantities with
their provenance. Every error names the file and the dotted field path, and says what was expected.

Shared by the profile's own sections (``hpi.planner.profiles``) and its node and cluster description
(``hpi.planner.wiring``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NoReturn, Sequence

from hpi.planner.specs.hardware import PROVENANCE_KINDS, Provenance

__all__ = ["ProfileError", "FieldReader", "QUANTITY_KEYS", "join_path"]

QUANTITY_KEYS = ("value", "source", "note")


class ProfileError(ValueError):
    """A hardware profile that cannot be found or read; the message names the file and the field."""


class FieldReader:
    """Reads typed fields out of the parsed YAML; every error names the file and the dotted field path."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.provenance: dict[str, Provenance] = {}

    def fail(self, path: str, message: str) -> NoReturn:
        raise ProfileError(f"{self.where}: {path}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str, *,
                required: bool = True) -> Mapping[str, Any] | None:
        value = data.get(key)
        full = join_path(path, key)
        if value is None:
            if required:
                self.fail(full, "missing section")
            return None
        if not isinstance(value, Mapping):
            self.fail(full, f"expected a mapping, got {type(value).__name__} {value!r}")
        return value

    def only(self, data: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
        unknown = [k for k in data if k not in allowed]
        if unknown:
            where = path or "top level"
            self.fail(join_path(path, str(unknown[0])),
                      f"unknown field in {where}; expected one of {', '.join(allowed)}")

    def text(self, data: Mapping[str, Any], key: str, path: str, *, default: str | None = None,
             choices: Sequence[str] | None = None) -> str:
        full = join_path(path, key)
        value = data.get(key, default)
        if value is None:
            self.fail(full, "missing; expected a string")
        if not isinstance(value, str):
            self.fail(full, f"expected a string, got {type(value).__name__} {value!r}")
        if choices is not None and value not in choices:
            self.fail(full, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def count(self, data: Mapping[str, Any], key: str, path: str, *, default: int | None = 0) -> int:
        """A structural count: a plain integer >= 0 (a {value, source} form is accepted too)."""
        full = join_path(path, key)
        value = data.get(key, default)
        if isinstance(value, Mapping):
            value = self.quantity(data, key, path)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(full, f"expected a whole number >= 0, got {value!r}")
        return value

    def quantity(self, data: Mapping[str, Any], key: str, path: str, *, required: bool = True,
                 positive: bool = False, at_most: float = math.inf) -> float | None:
        """A number with provenance, ``{value: 48.0e9, source: datasheet, note: "..."}``."""
        full = join_path(path, key)
        entry = data.get(key)
        if entry is None:
            if required:
                kinds = "|".join(PROVENANCE_KINDS)
                self.fail(full, f"missing; expected {{value: <number>, source: <{kinds}>, note: <text>}}")
            return None
        if not isinstance(entry, Mapping):
            self.fail(full, f"a plain {entry!r} has no provenance; write {{value: {entry!r}, source: "
                      f"<{'|'.join(PROVENANCE_KINDS)}>, note: \"where it comes from\"}}")
        self.only(entry, QUANTITY_KEYS, full)
        value = _number(entry.get("value"))
        if value is None:
            self.fail(join_path(full, "value"), f"expected a number, got {entry.get('value')!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > at_most:
            bound = f"> 0 and <= {at_most:g}" if at_most < math.inf else ("> 0" if positive else ">= 0")
            self.fail(join_path(full, "value"), f"expected a finite number {bound}, got {value!r}")
        source = self.text(entry, "source", full, choices=PROVENANCE_KINDS)
        note = entry.get("note", "")
        if not isinstance(note, str):
            self.fail(join_path(full, "note"), f"expected a string, got {note!r}")
        self.provenance[full] = Provenance(source=source, note=note)
        return value

    def name_list(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(v, str) for v in value):
            self.fail(path, f"expected a list of names, got {value!r}")
        return list(value)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _number(value: Any) -> float | None:
    """YAML 1.1 (PyYAML) reads ``48.0e9`` as a string; accept numeric strings as numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None
