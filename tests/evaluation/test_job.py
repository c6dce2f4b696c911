"""The eval history: entry names, the checkpoint fingerprint, and what --history reads back."""

from __future__ import annotations

import json

from hpi.evaluation.job import EvalJob, checkpoint_fingerprint, entry_name, read_history, write_entry


def test_the_fingerprint_sees_names_sizes_and_both_ends_of_each_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    big = bytearray(3 << 20)
    (ckpt / "model.safetensors").write_bytes(big)
    (ckpt / "config.json").write_text("{}")
    first = checkpoint_fingerprint(ckpt)
    assert first == checkpoint_fingerprint(ckpt) and len(first) == 64
    big[-1] = 1  # the last MiB is read
    (ckpt / "model.safetensors").write_bytes(big)
    assert checkpoint_fingerprint(ckpt) != first
    (ckpt / "config.json").rename(ckpt / "other.json")
    assert checkpoint_fingerprint(ckpt) not in (first,)


def test_entries_are_named_by_time_and_tasks_and_never_overwrite(tmp_path):
    assert entry_name(("a", "b"), 0.0) == "19700101T000000Z-a+b"
    assert entry_name(tuple(f"task{i:02d}" for i in range(20)), 0.0) == "19700101T000000Z-task00+19-more"
    job = EvalJob(url="http://x", checkpoint=str(tmp_path), tasks=("t",))
    results = {"results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t", "sample_len": 4}},
               "samples": {"t": []}}
    one = write_entry(tmp_path / "h", job, results, {"job": "d"}, {"ok": False}, now_s=0.0)
    two = write_entry(tmp_path / "h", job, results, {"job": "d"}, None, now_s=0.0)
    assert (one.name, two.name) == ("19700101T000000Z-t", "19700101T000000Z-t-2")
    assert "samples" not in json.loads((one / "results.json").read_text())
    assert not (two / "parity.json").exists()
    assert read_history(tmp_path / "h") == [
        {"entry": one.name, "scores": {"t": {"acc,none": 0.5}}, "parity_ok": False},
        {"entry": two.name, "scores": {"t": {"acc,none": 0.5}}, "parity_ok": None}]
    assert read_history(tmp_path / "nothing") == []
