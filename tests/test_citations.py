"""Code cites only documents that are in the repository: no file under src/ (code, profiles) names the team's
design notes, which live outside it; every ``docs/...`` page src/ cites exists; every run of the published-runs
table that cites this repository cites a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "design" + ".md"  # the team's notes, outside the repository (spelled apart so this file does not cite it)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w")  # docs/measured-facts.md, not a URL's .../docs/...


def _text_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                path.read_text()
            except UnicodeDecodeError:  # binary: nothing to cite
                continue
            files.append(path)
    return files


def test_nothing_under_src_cites_the_design_notes():
    files = _text_files(ROOT / "src")
    assert len(files) > 50 and any(p.suffix == ".yaml" for p in files)  # the code and the shipped profiles
    citing = [str(p.relative_to(ROOT)) for p in files if OUTSIDE in p.read_text()]
    assert not citing, f"cite docs/ (or state the fact in place) instead of {OUTSIDE}: {citing}"


def test_every_docs_page_cited_from_src_exists():
    cited = {(m.group(0), str(p.relative_to(ROOT)))
             for p in _text_files(ROOT / "src") for m in DOCS_PATH.finditer(p.read_text())}
    assert {page for page, _ in cited} >= {"docs/measured-facts.md"}  # the profiles and the cost model cite it
    missing = sorted((page, where) for page, where in cited if not (ROOT / page).is_file())
    assert not missing, f"cited from src/ but not in the repository: {missing}"


def test_published_runs_that_cite_this_repository_cite_files_in_it():
    runs = yaml.safe_load((ROOT / "validation" / "published_runs.yaml").read_text())["runs"]
    ours = [run for run in runs if run["source"].get("repo") == "hpi"]
    assert ours  # our own H100 measurements
    for run in ours:
        assert (ROOT / run["source"]["path"]).is_file(), run["id"]


def test_the_docs_page_holds_the_figures_the_profiles_quote_from_it():
    """The notes that quote a figure "(docs/measured-facts.md: X)" quote one the page has."""
    page = (ROOT / "docs" / "measured-facts.md").read_text()
    quoted = {m.group(1) for p in _text_files(ROOT / "src" / "planner" / "hardware_profiles")
              for m in re.finditer(r"docs/measured-facts\.md(?::| has) ([\d.]+)", p.read_text())}
    assert quoted >= {"53.6", "11.0", "1.28", "6.1", "128"}
    for figure in quoted:
        assert re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", page), figure
