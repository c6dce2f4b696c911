"""hpi.planner.validate's manifest: an exclusion's ``within`` limits a record pattern to some files, since record ids
(<file stem>/<entry>) repeat across sessions; and the shipped manifest leaves out exactly the compiled steps made
under the old inductor options."""

from __future__ import annotations

from pathlib import Path

from hpi.planner.validate import load_manifest

REPO = Path(__file__).resolve().parents[2]


def test_within_limits_a_record_pattern_to_the_files_it_names(tmp_path):
    manifest = tmp_path / "validation" / "set.yaml"
    manifest.parent.mkdir()
    manifest.write_text(
        "records: []\nexclude:\n"
        "  - record: '*-compiled'\n    within: results/old-*/records.json\n    metrics: [decode_step_s]\n"
        "    reason: old compile options\n"
        "  - record: 'run1/*'\n    reason: everywhere\n")
    within, everywhere = load_manifest(manifest).exclusions
    assert within.within == "results/old-*/records.json" and everywhere.within == ""
    assert within.matches("records/8b@b1-graphs-compiled", "results/old-1/records.json")
    assert not within.matches("records/8b@b1-graphs-compiled", "results/new-1/records.json")  # a later session's
    assert not within.matches("records/8b@b1-graphs", "results/old-1/records.json")
    assert everywhere.matches("run1/a", "results/any/records.json")


def test_the_shipped_set_leaves_out_only_the_old_compiled_steps():
    compiled = [e for e in load_manifest(REPO / "validation" / "fidelity_set.yaml").exclusions
                if e.pattern == "*-graphs-compiled"]
    assert len(compiled) == 1 and compiled[0].metrics == ("decode_step_s",)
    old = "benchmarks/results/2026-12-04-h200-split/call3/records-8b.json"
    assert compiled[0].matches("records-8b/8b-resident-b1@b1-graphs-compiled", old)
    assert not compiled[0].matches("records-8b/8b-resident-b1@b1-graphs", old)
    assert not compiled[0].matches("records-8b/8b-resident-b1@b1-graphs-compiled",
                                   "benchmarks/results/2026-12-06-h200/call1/records-8b.json")
