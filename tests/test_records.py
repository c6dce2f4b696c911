"""hpi.records: the RunRecord round-trips, and every record file kept in the repository reads, upgraded, with
nothing lost; files that hold no RunRecord are skipped with their reason, counted per file."""

from __future__ import annotations

import ast
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hpi.record_files import load_records
from hpi.records import (
    KIND,
    VERSION,
    DecodeSteps,
    HostToDevice,
    ModelInfo,
    NvmeReads,
    Output,
    Prediction,
    RankReport,
    RecordError,
    RunRecord,
    Software,
    Timings,
    Transfers,
    compare,
    upgrade,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Every JSON file kept under benchmarks/results/ and studies/: (RunRecords read, entries skipped by reason).
# A file added, removed or read differently fails the test until this table says so.
EVAL = "2026-12-03-h200-eval"  # hpi eval entries (results, launch descriptor, parity, samples, hpi serve's spec)
EVAL_ENTRIES = (f"{EVAL}/call1/evals/resident/20261203T095403Z-hpi_arith_mc+hpi_count_ppl+hpi_arith_gen",
                f"{EVAL}/call2/evals/resident/20261203T100310Z-hpi_arith_mc+hpi_count_ppl+hpi_arith_gen",
                f"{EVAL}/call2/evals/zero3-cpu-offload/20261203T100444Z-hpi_arith_mc+hpi_count_ppl+hpi_arith_gen")
EVAL_ENTRY_FILES = ("launch.json", "parity.json", "results.json", "runtime/spec.json", "runtime-url.json",
                    "samples.json")
KEPT = {
    "2026-11-22-autotune-sim/autotune_sim.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/autotune/best_ds_config.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/autotune/best_plan.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/autotune/runs/baseline-ds-examples-b1.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/autotune/runs/trial-0000.json": (1, {}),
    "2026-11-22-h100/autotune/runs/trial-0001.json": (1, {}),
    "2026-11-22-h100/autotune/runs/trial-0002.json": (1, {}),
    "2026-11-22-h100/autotune/runs/trial-0003.json": (1, {}),
    "2026-11-22-h100/autotune/runs/trial-0004.json": (0, {"error": 1}),
    "2026-11-22-h100/autotune/summary.json": (0, {"baseline": 1}),
    "2026-11-22-h100/h100-sxm-1gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/host-jitter/run11-host-jitter.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/run1-8b-stream-ordered.json": (12, {"error": 2}),
    "2026-11-22-h100/run10-graphs-8b-eager-prefill.json": (6, {}),
    "2026-11-22-h100/run11-graphs-8b-rerun.json": (6, {}),
    "2026-11-22-h100/run12-probe/h100-sxm-1gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/run13-probe/h100-sxm-1gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/run14-layer-scaling/ls70b/layer_scaling.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/run14-layer-scaling/ls8b/layer_scaling.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h100/run2-8b-quant-baselines-33b.json": (9, {"baseline": 2}),
    "2026-11-22-h100/run4-ds-examples-b256.json": (0, {"baseline": 1}),
    "2026-11-22-h100/run4-hpi-w16-b256.json": (1, {}),
    "2026-11-22-h100/run5-33b-q4-nvme-attempt.json": (1, {"error": 1}),
    "2026-11-22-h100/run6-8b-nvme.json": (2, {}),
    "2026-11-22-h100/run7-8b-nvme-buffers.json": (2, {}),
    "2026-11-22-h100/run8-graphs-8b.json": (6, {}),
    "2026-11-22-h100/run9-graphs-8b-grouped-attention.json": (6, {}),
    "2026-11-22-h200x2/run1-smoke-tiny.json": (2, {}),
    "2026-11-22-h200x2/run1-smoke8b-h100profile.json": (2, {"baseline": 1}),
    "2026-11-22-h200x2/run2-8b-offload-matrix.json": (6, {"baseline": 1}),
    "2026-11-22-h200x2/run3-8b-baselines.json": (0, {"baseline": 3}),
    "2026-11-22-h200x2/run3-8b-tp2-pp2.json": (4, {}),
    "2026-11-22-h200x2/run4-graphs-8b.json": (14, {}),
    "2026-11-22-h200x2/run5-probe/h200-2gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h200x2/run6-probe/h200-2gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h200x4/h200-4gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-11-22-h200x4/run1-70b-matrix.json": (14, {}),
    "2026-11-22-h200x4/run2-70b-remaining-a.json": (5, {}),
    "2026-11-22-h200x4/run3-70b-remaining-b.json": (4, {}),
    "2026-11-22-h200x4/run4-70b-graphs.json": (24, {}),
    "2026-11-22-h200x4/run5-probe/h200-4gpu.probe.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callA-first/8b-mixed.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callA-first/8b-off-fused.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callA-first/8b-off-separate.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callA-first/8b-run-b1.run.json": (1, {}),
    "2026-12-02-h200-serve/callA-first/8b-run-b64.run.json": (1, {}),
    "2026-12-02-h200-serve/callA-first/8b.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callB/70b-q4-run-b1.run.json": (1, {}),
    "2026-12-03-h200-moe/call1/records.json": (3, {}),
    "2026-12-03-h200-moe/call2/load.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-moe/call2/records.json": (1, {}),
    "2026-12-02-h200-serve/callB/8b-mixed.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callB/8b-run-b1.run.json": (1, {}),
    "2026-12-02-h200-serve/callB/8b-run-b64.run.json": (1, {}),
    "2026-12-02-h200-serve/callB/8b.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callC-70b/70b-q4-c1.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-02-h200-serve/callC-70b/70b-q4-c16.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-bad-inputs/after.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-bad-inputs/before.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run1-cpu-tiny-llama.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run1-gpu-llama-3-8b-slots1.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run1-gpu-llama-3-8b-slots8.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run2-cpu-tiny-llama.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run2-gpu-llama-3-8b-slots1.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-metrics/run2-gpu-llama-3-8b-slots8.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-serve-metrics/m70b-call1/m70b.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-serve-metrics/m70b-call1/m70b.metrics.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-serve-metrics/m8b-call2/m8b.load.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-serve-metrics/m8b-call2/m8b.metrics.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-aio/aio/aio_probe.json": (0, {"not a RunRecord": 1}),
    "2026-12-03-h200-aio/aio/records.json": (2, {}),
    "2026-12-04-h200-fused/call1/compile-8b.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-fused/call1/records-8b.json": (5, {}),
    "2026-12-04-h200-fused/call2/records-70b.json": (4, {}),
    "2026-12-04-h200-fused/call3/compile-8b-reference.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-fused/call3/records-33b.json": (3, {}),
    "2026-12-04-h200-fused/call4/records-70b-b32-expandable.json": (4, {}),
    "2026-12-04-h200-fused/call4/records-70b-b32-first.json": (4, {}),
    "2026-12-04-h200-fused/call5/compile-8b-128.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-fused/call5/compile-8b-544.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-fused/call6/compile-8b-544-no-cudnn.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-split/call2/compile-544.json": (0, {"not a RunRecord": 1}),
    "2026-12-04-h200-split/call3/records-70b-b32.json": (4, {}),
    "2026-12-04-h200-split/call3/records-70b.json": (4, {}),
    "2026-12-04-h200-split/call3/records-8b.json": (5, {}),
    "2026-12-04-h200-split/call4/compile-544-b1-b16.json": (0, {"not a RunRecord": 1}),
    **{f"2026-12-05-h200-issue20/{name}": (0, {"not a RunRecord": 1}) for name in (
        "call1/compile-repro.json", "call2/h200-1gpu-probed.probe.json", "call2/r8/profile-rank0.json",
        "call3/aio/aio_probe.json", "call4/compile-cdt-all-2.json",
        *(f"call2/m70/70b-q4-cpu-pinned-b1/{v}profile-rank0.json" for v in ("", "variant-1/", "variant-2/",
                                                                           "variant-3/")))},
    "2026-12-05-h200-issue20/call2/m70/records.json": (4, {}),
    "2026-12-05-h200-issue20/call2/r8/record.json": (1, {}),
    "2026-12-05-h200-issue20/call3/aio/records.json": (3, {}),
    **{f"2026-12-05-h100-issue20/{name}": (0, {"not a RunRecord": 1}) for name in (
        "call2/h100-1gpu-probed.probe.json", "call3/compile-ref.json", "call3/r8-pystack/profile-rank0.json",
        "call4/compile-b16.json",
        *(f"call2/m70-pystack/70b-q4-cpu-pinned-b1/{v}profile-rank0.json" for v in ("", "variant-1/", "variant-2/",
                                                                           "variant-3/")))},
    "2026-12-05-h100-issue20/call1/m8/records.json": (5, {}),
    "2026-12-05-h100-issue20/call2/m70-pystack/records.json": (4, {}),
    "2026-12-05-h100-issue20/call3/r8-pystack/record.json": (1, {}),
    "2026-12-05-cpu-zero3-leaf/zero3_leaf.json": (0, {"not a RunRecord": 1}),
    "2026-12-05-h200-leaf/call1/leaf70/records.json": (3, {}),
    "2026-12-05-h200-leaf/call1/mod70/records.json": (3, {}),
    "2026-12-05-h200-leaf/call2/leaf70b/records.json": (3, {}),
    "2026-12-05-h200-leaf/call2/m8lay/records.json": (2, {}),
    "2026-12-05-h200-leaf/call2/m8mod/records.json": (2, {}),
    **{f"2026-12-05-issue20-leaf-agreement/call1/{name}": (0, {"not a RunRecord": 1})
       for name in ("attn.json", "compile-ref.json", "h100-sxm-1gpu-probed.probe.json")},
    "2026-12-05-issue20-leaf-agreement/call2/moeleaf/records.json": (6, {}),
    "2026-12-05-issue20-leaf-agreement/call2/m8b/records.json": (4, {}),
    "2026-12-05-issue20-leaf-agreement/call3/moeleaf3e9/records.json": (6, {}),
    "2026-12-05-issue20-leaf-agreement/call4/moeleaf5e7/records.json": (3, {}),
    "2026-12-06-issue20-ds-numel/call1/moe1layer/records.json": (6, {}),
    "2026-12-06-issue20-ds-numel/call2/compile-mm.json": (0, {"not a RunRecord": 1}),
    "2026-12-06-issue20-ds-numel/call3/moepair/records.json": (6, {}),
    "2026-12-06-prefetch-lag/call1-profiled/records.json": (3, {"error": 1}),  # the one-layer row, cut by timeout
    "2026-12-06-prefetch-lag/call2-pair/records.json": (6, {}),
    "2026-12-06-event-wait/call1/records.json": (13, {}),
    "2026-12-06-event-wait/call2/records.json": (11, {}),
    "2026-12-06-event-wait/call3/records.json": (4, {"error": 2}),  # the NVMe rows: no libaio debs carried
    "2026-12-06-event-wait/call4/records.json": (4, {}),
    **{f"2026-12-06-skinny/{name}": (0, {"not a RunRecord": 1})
       for name in ("call1/compile-b1.json", "call1/compile-b16.json", "call2/compile-b16-prof.json",
                    "call2/skinny.json", "call3/compile-b1.json", "call3/compile-b16.json",
                    "call5/compile-skinny.json")},
    "2026-12-06-skinny/call4/m8-skinny/records.json": (5, {}),
    "2026-12-06-skinny-switch/call1/m8-sbs/records.json": (9, {}),
    "2026-12-06-skinny-switch/call2/replay-eager.json": (0, {"not a RunRecord": 1}),
    "2026-12-06-skinny-switch/call3/m8-sbs2/records.json": (9, {}),
    **{f"2026-12-06-skinny-switch/call4/attn-{slots}.json": (0, {"not a RunRecord": 1}) for slots in (544, 1024)},
    **{f"2026-12-06-pdl/{name}": (0, {"not a RunRecord": 1})
       for name in ("call1/compile-b16.json", "call2/compile-b16.json", "call2/skinny-pdl.json",
                    "call3/compile-b1.json")},
    **{f"2026-12-06-pdl-l2/{name}": (0, {"not a RunRecord": 1})
       for name in ("call1/compile-b16.json", "call2/skinny-pdl.json", "call3/skinny-pdl-wide.json")},
    **{f"2026-12-07-attn-walk/call1/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("attn-544", "attn-768", "attn-1024", "compile-b16")},
    **{f"2026-12-07-attn-trim/call1/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("attn-544", "attn-768", "attn-1024", "compile")},
    **{f"2026-12-07-walks/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("call1/attn-544", "call1/attn-768", "call1/attn-1024", "call1/compile", "call2/compile")},
    **{f"2026-12-07-compiles/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("call1/compile", "call2/compile1", "call2/compile16", "call4/run-b1/spec", "call4/run-b16/spec")},
    "2026-12-07-compiles/call3/records.json": (5, {}),
    **{f"2026-12-07-l2-prefetch/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("call1/compile", "call1/l2", "call2/compile", "call2/l2")},
    **{f"2026-12-07-fewer-kernels/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("call1/compile", "call2/combo")},
    **{f"2026-12-08-combo/{name}.json": (0, {"not a RunRecord": 1}) for name in ("call1/combo-b1", "call2/combo-b16")},
    "2026-12-07-compiles/call4/run-b1/record.json": (1, {}),
    "2026-12-07-compiles/call4/run-b16/record.json": (1, {}),
    **{f"2026-12-07-warmup/{name}.json": (1, {})
       for name in ("call1/record-b1", "call1/record-b16", "call1/record-b1-cold", "call2/record-b1",
                    "call2/record-b16")},
    **{f"2026-12-06-prefetch-lag/call1-profiled/profiles/{name}.json": (0, {"not a RunRecord": 1})
       for name in ("1layer-ds-b1", "1layer-fused-b1", "3e9-ds-b1", "3e9-fused-b1", "3e9-fused-b16")},
    "2026-12-03-h200-moe2/call1/ds/records.json": (2, {}),
    "2026-12-03-h200-moe2/call1/moe/records.json": (2, {}),
    "2026-12-03-h200-moe2/call2/leaves/records.json": (6, {}),
    "2026-12-03-h200-moe2/call3/load/load.json": (0, {"not a RunRecord": 1}),
    **{f"{entry}/{name}": (0, {"not a RunRecord": 1}) for entry in EVAL_ENTRIES for name in EVAL_ENTRY_FILES},
    f"{EVAL}/call2/eval-summary-bf16-tolerances.json": (0, {"not a RunRecord": 1}),
    f"{EVAL}/call2/eval-summary.json": (0, {"not a RunRecord": 1}),
    f"{EVAL}/call2/hf-bfloat16.json": (0, {"not a RunRecord": 3}),  # lm-eval's results, samples, n-shot
    f"{EVAL}/call2/hf-float32.json": (0, {"not a RunRecord": 3}),
}


def _kept_files() -> list[Path]:
    return sorted([*RESULTS.rglob("*.json"), *(REPO / "studies").rglob("*.json")])


def _name(path: Path) -> str:
    return str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else str(path.relative_to(REPO))


def _raw_entry(record: RunRecord) -> dict:
    """The document a record was read from, as it is in its file."""
    data = json.loads(Path(record.source.path).read_text())
    doc = data[record.source.entry] if record.source.entry is not None else data
    return doc["record"] if doc.get("kind") == "hpi.AutotuneTrial" else doc


def _carries(new, old, where: str = "record") -> None:
    """Everything in ``old`` is in ``new``, equal (``new`` may carry more: keys version 2 always writes)."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} was lost"
            _carries(new[key], value, f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old)):
            _carries(a, b, f"{where}[{i}]")
    else:
        assert new == old or (isinstance(old, float) and math.isnan(old) and math.isnan(new)), \
            f"{where}: {new!r} != {old!r}"


@pytest.fixture(scope="module")
def kept() -> dict[str, object]:
    return {_name(path): load_records(path) for path in _kept_files()}


# ---- the kept files -----------------------------------------------------------------------------------


def test_every_kept_file_reads_with_its_records_and_skips_counted(kept) -> None:
    assert {name: (len(r), r.skipped) for name, r in kept.items()} == KEPT
    records = [r for got in kept.values() for r in got]
    assert len(records) == 322
    assert sum(1 for r in records if r.entry is not None) == 303  # gpu_matrix bundles {name: record}
    assert sum(1 for r in records if r.source.id.startswith("trial-")) == 4  # hpi autotune trial files
    skipped: dict[str, int] = {}
    for got in kept.values():
        for reason, n in got.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"not a RunRecord": 140, "error": 7, "baseline": 9}
    # Read together, names are unique (validate and calibrate key on them): a rerun kept under the stem of an
    # earlier run is named with its folder, and so is the earlier one.
    together = {r.record_id for r in load_records(_kept_files())}
    assert len(together) == 322
    assert {"callA-first/8b-run-b1.run", "callB/8b-run-b1.run", "70b-q4-run-b1.run"} <= together


def test_every_kept_record_is_upgraded_and_loses_nothing(kept) -> None:
    versions: dict[int, int] = {}
    for record in (r for got in kept.values() for r in got):
        raw = _raw_entry(record)
        doc = record.to_json()
        assert doc["kind"] == KIND and doc["version"] == VERSION == 5
        versions[raw["version"]] = versions.get(raw["version"], 0) + 1
        if raw["version"] == VERSION:  # written by this hpi: read back exactly as written
            assert doc == raw, record.record_id
        if raw["version"] in (2, 3, 4):  # every key it wrote, as written; version 3 adds the ranks' build host
            # memory, version 4 the compile time of a compiled decode step (the timings' and the ranks' compile_s),
            # version 5 the ranks' hooked module count
            new = {4: ("zero3_hooked_modules",), 3: ("zero3_hooked_modules", "compile_s"),
                   2: ("zero3_hooked_modules", "compile_s", "host_rss_before_build_bytes", "host_build_peak_bytes")}
            ranks = [{k: v for k, v in r.items() if k not in new[raw["version"]]} for r in doc["ranks"]]
            timings = {k: v for k, v in doc.items() if k != "compile_s" or raw["version"] == 4}
            assert {**timings, "version": raw["version"], "ranks": ranks} == raw, record.record_id
        _carries(doc, upgrade(raw), record.record_id)
        assert RunRecord.from_json(doc) == record
    # hpi serve's GPU call (2026-12-02) kept the first version-2 records, the MoE calls (2026-12-03) version 3's,
    # the compiled / fused / split-KV calls (2026-12-04) version 4's, the ZeRO-3 leaf calls (2026-12-05) version 5's
    # (13 that morning, 19 that night, 12, 9, 32 and 5 on 2026-12-06)
    assert versions == {1: 130, 2: 5, 3: 16, 4: 51, 5: 120}


def test_known_figures_of_known_files(kept) -> None:
    nvme = {r.record_id: r for r in kept["2026-11-22-h100/run6-8b-nvme.json"]}["run6-8b-nvme/8b-nvme-b1"]
    assert nvme.timings.decode_step_s.median_s == 10.755297439000003
    assert nvme.timings.prefill_s == 10.944441618999974
    assert nvme.transfers.nvme.device == "vda" and nvme.transfers.nvme.device_read_bytes == 64239960064
    assert nvme.transfers.h2d.bytes_per_step == 16059990016
    assert nvme.measured_vs_predicted["decode_step_s"].measured == nvme.timings.decode_step_s.median_s
    assert nvme.software == Software("3.12.3", "2.11.0+cu130", "0.19.8", "5.17.0", "13.0")
    trial = kept["2026-11-22-h100/autotune/runs/trial-0000.json"][0]
    assert trial.record_id == "trial-0000" and trial.timings.decode_step_s.median_s == 0.38645843499999444
    assert trial.gpu_peak_allocated_bytes == 33870067200
    tp4 = {r.record_id: r
           for r in kept["2026-11-22-h200x4/run1-70b-matrix.json"]}["run1-70b-matrix/70b-tp4-resident-b1"]
    assert tp4.world_size == 4 and len(tp4.ranks) == 4 and tp4.model.name == "llama-3-70b"
    assert tp4.timings.decode_step_s.median_s == 0.1355750430000029
    # A record written before spec.fetch_wait existed ran DeepSpeed's host wait; a later one says stream.
    old = {r.record_id: r
           for r in kept["2026-11-22-h200x2/run3-8b-tp2-pp2.json"]}["run3-8b-tp2-pp2/8b-tp2-resident-b1"]
    assert "fetch_wait" not in old.spec and old.conditions.fetch_wait == "host"
    assert nvme.conditions.fetch_wait == "stream"
    assert old.conditions.decode_graphs is False and old.conditions.prompt_len_tokens == 512


def test_the_kept_fractions_are_the_derived_ones(kept) -> None:
    """``fraction_of_profile`` is not stored in the typed record but derived: it must give the figure each file kept."""
    n = 0
    for record in (r for got in kept.values() for r in got):
        stored = _raw_entry(record)["h2d"]["fraction_of_profile"]
        assert record.transfers.h2d.fraction_of_profile == stored
        n += stored is not None
    assert n == 177  # the 2026-12-03 MoE and aio calls: 16 streamed runs with a profile; 2026-12-04: 12, then 8;
    # 2026-12-05: 7 on the H200, 4 on the H100, then 13 of the ZeRO-3 leaf calls, then the night's 19;
    # 2026-12-06: 12 on the H100, then 9 (the prefetch-lag calls), then 32 (the event-wait calls)


# ---- the record itself --------------------------------------------------------------------------------


def _full_record() -> RunRecord:
    """A record with every part filled, as the executor builds one."""
    timings = Timings(prefill_s=1.0, ttft_s=1.0, decode_step_s=DecodeSteps(2.0, 2.5, 2.1, (2.0, 2.5, 1.8)), total_s=7.3,
                      throughput_tok_s=1.1, pp_bubble_ratio=0.1, tp_allreduce_s_per_step=0.01, build_s=30.0,
                      decode_forwards=3)
    prediction = Prediction(feasible=True, prefill_s=0.9, decode_step_s=1.5, total_s=5.4, ttft_s=0.9,
                            throughput_tok_s=1.5,
                            detail={"memory": {"gpu_peak_bytes": 9e9}, "placement": {"nvme_read_bytes_s": 2e9}})
    ranks = tuple(RankReport(rank=r, coords=(r, 0, 0), device_name="NVIDIA H100",
                             forward_end_s=[1.0, 3.0, 5.5, 7.3], busy_s=[1.0, 1.9, 2.4, 1.7],
                             peak_allocated_bytes=3_000_000_000 + r, nvme_bytes_per_forward=4, nvme_device="nvme0n1",
                             nvme_read_bytes=12, nvme_read_interval_s=6.0, nvme_avg_queue_depth=24.0)
                  for r in range(2))
    return RunRecord(
        spec={"model": "llama-3-8b", "hardware": "h100-sxm-1gpu", "dtype": "bf16", "fetch_wait": "stream",
              "decode_graphs": False, "workload": {"prompt_len_tokens": 512, "gen_len_tokens": 4}, "out_dir": "/r/x"},
        plan={"offload": "nvme", "tp": 2, "batch_size": 1}, model=ModelInfo("llama-3-8b", 8_030_261_248, 8_030_261_248),
        hardware="h100-sxm-1gpu", device="cuda", devices=("NVIDIA H100",), world_size=2,
        software=Software("3.12.3", "2.11.0", "0.19.8", "5.17.0", "13.0"), timings=timings,
        transfers=Transfers(HostToDevice(16e9, 8e9, 54e9),
                            NvmeReads(4, 2.0, 2.5, {"queue_depth": 64}, "nvme0n1", 12, 2.0, 24.0)),
        ranks=ranks, prediction=prediction, measured_vs_predicted=compare(timings, prediction, 3e9),
        output=Output(tokens=[[1, 2, 3, 4]], generated_tokens_per_sequence=4, prompt_len_tokens_actual=7,
                      prompt_tokens_per_row=[7], texts=["a b c d"]),
        variant_records=("variant-1/record.json",), entry={"name": "8b-nvme"}, entry_wall_s=99.0,
    )  # fmt: skip


def test_round_trip_of_a_built_record() -> None:
    record = _full_record()
    doc = record.to_json()
    assert RunRecord.from_json(doc) == record
    assert RunRecord.from_json(json.loads(json.dumps(doc))) == record  # through real JSON text
    assert doc["decode_step_s"] == {"median": 2.0, "p90": 2.5, "mean": 2.1, "all": [2.0, 2.5, 1.8]}
    assert doc["h2d"]["fraction_of_profile"] == pytest.approx(8 / 54) and doc["nvme"]["fraction_of_profile"] == 0.8
    assert doc["measured_vs_predicted"]["decode_step_s"] == {"measured": 2.0, "predicted": 1.5}
    assert doc["measured_vs_predicted"]["gpu_peak_bytes"] == {"measured": 3e9, "predicted": 9e9}
    assert doc["ranks"][1]["coords"] == [1, 0, 0] and doc["tokens"] == [[1, 2, 3, 4]]
    assert record.output.tokens == ((1, 2, 3, 4),)  # lists given are held as tuples
    assert record.gpu_peak_allocated_bytes == 3_000_000_001 and record.record_id == "8b-nvme"
    assert record.prediction.nvme_read_bytes_s == 2e9
    assert record.measured_vs_predicted["prefill_s"].ratio == pytest.approx(1 / 0.9)


def test_slim_drops_the_payloads_and_reads_back() -> None:
    slim = _full_record().slim()
    assert slim.output.tokens == () and slim.output.texts is None and slim.timings.decode_step_s.all_s == ()
    assert all(r.forward_end_s == () and r.busy_s == () and r.tokens is None for r in slim.ranks)
    assert slim.timings.decode_step_s.median_s == 2.0 and slim.gpu_peak_allocated_bytes == 3_000_000_001
    assert RunRecord.from_json(slim.to_json()) == slim
    assert _full_record().without_tokens().timings.decode_step_s.all_s == (2.0, 2.5, 1.8)


def test_build_host_memory_of_the_ranks_round_trips_and_sums_per_node() -> None:
    ranks = (RankReport(rank=0, host_rss_before_build_bytes=2_000, host_build_peak_bytes=90_000),
             RankReport(rank=1, host_rss_before_build_bytes=2_500, host_build_peak_bytes=80_000))
    record = RunRecord(ranks=ranks)
    assert RunRecord.from_json(record.to_json()) == record
    assert record.host_build_peak_bytes == 170_000
    old = RunRecord.from_json({"kind": KIND, "version": 2, "ranks": [{"rank": 0, "host_rss_bytes": 5}]})
    assert old.ranks[0].host_build_peak_bytes is None and old.host_build_peak_bytes == 0  # not measured


def test_the_hooked_module_count_round_trips_and_older_ranks_read_it_as_not_counted() -> None:
    record = RunRecord(ranks=(RankReport(rank=0, zero3_hooked_modules=29),))
    assert RunRecord.from_json(record.to_json()) == record
    assert record.to_json()["ranks"][0]["zero3_hooked_modules"] == 29
    old = RunRecord.from_json({"kind": KIND, "version": 4, "ranks": [{"rank": 0, "compile_s": 1.0}]})
    assert old.ranks[0].zero3_hooked_modules is None and old.to_json()["version"] == 5


def test_version_1_shapes_upgrade_and_the_current_version_names_every_key() -> None:
    v1 = {"kind": KIND, "version": 1, "decode_step_s": 0.5, "workload": {"prompt_len_tokens": 8},
          "spec": {"workload": {"prompt_len_tokens": 8}}, "nvme": {"bytes_per_step": 4, "achieved_read_bytes_s": 2.0,
          "device": None, "why_no_device_figures": "tmpfs"}}  # fmt: skip
    record = RunRecord.from_json(v1)
    assert record.timings.decode_step_s == DecodeSteps(0.5, 0.5, 0.5)  # one number: its own distribution
    assert record.transfers.nvme.why_no_device_figures.startswith("the NVMe folder is on no block device")
    doc = record.to_json()
    assert "workload" not in doc and doc["version"] == 5 and doc["spec"]["workload"] == {"prompt_len_tokens": 8}
    assert set(RunRecord().to_json()) == set(doc)  # every key, null where nothing was measured
    assert RunRecord().to_json()["nvme"] is None and RunRecord().to_json()["texts"] is None


@pytest.mark.parametrize("doc,message", [
    ({"kind": "hpi.LayerScaling"}, "not a RunRecord"),
    ({"kind": KIND, "version": 6}, "version 6 is not one this hpi reads"),
    ({"kind": KIND, "version": 2, "prefil_s": 1.0}, "unknown field 'prefil_s'"),
    ({"kind": KIND, "h2d": {"bytes_per_step": 1, "bandwidth": 2}}, r"record.h2d: unknown field 'bandwidth'"),
    ({"kind": KIND, "ranks": [{"rank": 0, "gpu": "x"}]}, r"record.ranks\[0\]: unknown field 'gpu'"),
    ({"kind": KIND, "decode_step_s": {"p90": 1.0}}, "decode_step_s has no median"),
])  # fmt: skip
def test_what_is_not_a_readable_record_is_refused_by_name(doc, message) -> None:
    with pytest.raises(RecordError, match=message):
        RunRecord.from_json(doc)


def test_conditions_default_to_what_old_runs_ran_with() -> None:
    c = RunRecord(spec={"model": "m", "workload": {"prompt_len_tokens": 8, "gen_len_tokens": 2}}).conditions
    assert (c.model, c.prompt_len_tokens, c.gen_len_tokens) == ("m", 8, 2)
    assert (c.dtype, c.fetch_wait, c.decode_graphs) == ("bf16", "host", False)
    assert RunRecord(plan={"tp": 2}).record_id.startswith("record-")  # no source, entry or folder: a plan hash
    assert replace(RunRecord(), spec={"out_dir": "/runs/abc"}).record_id == "abc"


def test_records_is_pure_standard_library() -> None:
    """The planner and the executor both import hpi.records: it must import neither, nor any other package."""
    tree = ast.parse((REPO / "src" / "records.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert {name.split(".")[0] for name in names} - {"__future__"} <= set(sys.stdlib_module_names), names
