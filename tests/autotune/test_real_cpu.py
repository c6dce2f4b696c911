"""``hpi autotune`` against real runs: the executor on DeepSpeed's CPU accelerator, tiny-llama, two trials and
the DeepSpeedExamples-knobs baseline side by side (three launches, ~35 s on 2 cores)."""

from __future__ import annotations

import json

import pytest

from hpi.cli import main

pytest.importorskip("torch")
pytest.importorskip("deepspeed")


def test_real_cpu_autotune_launches_trials_and_the_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code = main(["autotune", "--model", "tiny-llama", "--hardware", "h100-sxm-1gpu", "--device", "cpu", "--trials", "2",
                 "--seeds", "2", "--max-batch", "4", "--prompt-len", "8", "--gen-len", "3", "--warmup-steps", "0",
                 "--timeout", "300", "--studies-dir", str(tmp_path), "--baseline", "ds-examples-knobs", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["trials"] == 2 and doc["runs"] == 2 and doc["statuses"] == {"ok": 2}, doc
    assert doc["best"]["throughput_tok_s"] > 0 and doc["best"]["batch_size"] <= 4
    base = doc["baseline"]
    assert base["status"] == "ok" and base["kind"] == "ds-examples-knobs" and base["batch"] == doc["best"]["batch_size"]
    assert base["plan"]["prefetch_bucket_elems"] == 2 * 64 * 64 and base["plan"]["persistence_threshold_elems"] == 64
    assert doc["ratio_over_baseline"] == pytest.approx(doc["best"]["throughput_tok_s"]
                                                       / base["measured"]["throughput_tok_s"])
    runs = tmp_path / doc["study"] / "runs"
    for i in range(2):  # the executor's own run folder and the trial's record beside it
        record = json.loads((runs / f"trial-{i:04d}" / "record.json").read_text())
        assert record["kind"] == "hpi.RunRecord" and record["device"] == "cpu"
        trial = json.loads((runs / f"trial-{i:04d}.json").read_text())
        assert trial["status"] == "ok" and trial["record"]["plan"] == record["plan"]
        plan = record["plan"]  # graphs by default, where the plan allows them (the CPU runs the static path)
        resident = (plan["offload"] == "none" and plan["weight_bits"] == 16 and not plan["kv_offload"]
                    and plan["dp"] == 1)
        assert record["spec"]["decode_graphs"] is resident and record["spec"]["workload"]["decode_graphs"] is resident
    assert (runs / f"baseline-ds-examples-knobs-b{base['batch']}.json").is_file()
