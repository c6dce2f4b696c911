"""RunRecords from files: one record, a bundle {name: record}, a list, autotune trials, or folders of them.

``load_records`` reads what ``hpi.records.RunRecord`` parses and counts, by reason, what it leaves out
(``skip_reason``: error entries, other tools' baselines, any other JSON). Pure (the standard library only).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hpi.records import KIND, TRIAL_KIND, RecordError, RunRecord, Source

__all__ = ["RecordList", "load_records", "skip_reason"]

# ---- files, bundles, folders --------------------------------------------------------------------------


class RecordList(list):
    """``load_records``' result: RunRecords, plus ``skipped``: how many entries were left out, by reason."""

    def __init__(self, records: Iterable[RunRecord] = (), skipped: Mapping[str, int] | None = None) -> None:
        super().__init__(records)
        self.skipped: dict[str, int] = dict(skipped or {})


def _unwrap(entry: Any) -> Any:
    """An autotune trial's own RunRecord; any other entry as it is (a failed trial has no record: skipped)."""
    if isinstance(entry, Mapping) and entry.get("kind") == TRIAL_KIND and isinstance(entry.get("record"), Mapping) \
            and "error" not in entry:
        return entry["record"]
    return entry


def skip_reason(entry: Any) -> str | None:
    """Why an entry of a record file is not a RunRecord (None: it is one): an error entry, a baseline (another
    tool's run: DeepSpeedExamples, HF), or any other JSON (a probe, a plan, a summary)."""
    entry = _unwrap(entry)
    if not isinstance(entry, Mapping):
        return "not a JSON object"
    if "error" in entry:
        return "error"
    if entry.get("kind") != KIND:
        return "baseline" if "baseline" in entry else "not a RunRecord"
    return None


def _entries(data: Any, path: Path) -> list[tuple[str | None, Any]]:
    """(entry name, value) pairs of a record file: one record, a list of them, or a bundle {name: record}."""
    if isinstance(data, list):
        return [(None, item) for item in data]
    if isinstance(data, dict) and "kind" not in data and all(isinstance(v, dict) for v in data.values()) and data:
        return list(data.items())
    if isinstance(data, dict):
        return [(None, data)]
    raise RecordError(f"{path}: expected a RunRecord, a list of them or a bundle {{name: record}}, "
                      f"got {type(data).__name__}")


def _default_id(path: Path, entry: str | None, index: int, n: int) -> str:
    if entry is not None:
        return f"{path.stem}/{entry}"
    base = f"{path.parent.name}/{path.stem}" if path.stem == "record" else path.stem
    return base if n == 1 else f"{base}[{index}]"


def _files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise RecordError(f"record path {p} does not exist: pass a record file, a bundle or a folder")
    return files


def load_records(paths: str | Path | Sequence[str | Path]) -> RecordList:
    """RunRecords from files, bundles ({entry name: record}), lists, or folders (every ``*.json``, recursively).
    An ``hpi autotune`` trial file stands for the RunRecord it holds.

    Baselines, error entries and other JSON are skipped and counted in the result's ``skipped`` by reason
    (``skip_reason``); each record's ``source`` says where it was found and names it (``record_id``).
    """
    out = RecordList()
    found: list[tuple[Path, str | None, str, Mapping[str, Any]]] = []
    for path in _files(paths):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        except OSError as e:
            raise RecordError(f"cannot read record file {path}: {e.strerror}") from None
        entries = _entries(data, path)
        for index, (name, entry) in enumerate(entries):
            reason = skip_reason(entry)
            if reason:
                out.skipped[reason] = out.skipped.get(reason, 0) + 1
                continue
            found.append((path, name, _default_id(path, name, index, len(entries)), entry))
    # Two files of one stem in different folders (a rerun kept beside the first) would share a name; validate
    # and calibrate key on it, so every record of a shared name is named with its folder too.
    seen = Counter(rid for _, _, rid, _ in found)
    for path, name, rid, entry in found:
        rid = f"{path.parent.name}/{rid}" if seen[rid] > 1 else rid
        out.append(RunRecord.from_json(_unwrap(entry), source=Source(str(path), name, rid)))
    return out
