"""Every notebook under notebooks/ runs top to bottom as a script (its asserts are the checks).

The fidelity notebook re-derives `hpi validate`'s numbers by hand; here it runs on the records of two small
machines (the 2x H200 and a lent drive's profile: 31 records, 29 plans) so that its leave-one-plan-out folds take
about two minutes, not half an hour. Every check it makes holds for any subset; the whole set is validated at each
stop (`hpi validate --json`, kept beside each session's records)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SMALL_FIDELITY_SET = ("h200-2gpu", "benchmarks/results/2026-12-05-h200-issue20/call3/aio/h200-1gpu-aio.yaml")
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys, monkeypatch):
    monkeypatch.setenv("HPI_FIDELITY_PROFILES", ",".join(SMALL_FIDELITY_SET))
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out  # it showed its working
