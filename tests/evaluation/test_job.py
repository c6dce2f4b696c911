"""The eval history: entry names, the checkpoint fingerprint, and what --history reads back."""

from __future__ import annotations

import json

from hpi.evaluation.job import EvalJob, checkpoint_fingerprint, entry_name, new_entry, read_history, write_entry


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
    results = {"results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t", "sample_len": 4}},
               "samples": {"t": []}}
    one = write_entry(new_entry(tmp_path / "h", ("t",), now_s=0.0), results, {"job": "d"}, {"ok": False},
                      samples=True)
    two = write_entry(new_entry(tmp_path / "h", ("t",), now_s=0.0), results, {"job": "d"}, None)
    assert (one.name, two.name) == ("19700101T000000Z-t", "19700101T000000Z-t-2")
    assert "samples" not in json.loads((one / "results.json").read_text())
    assert not (two / "parity.json").exists() and not (two / "samples.json").exists()
    assert json.loads((one / "samples.json").read_text()) == {"t": []}
    assert read_history(tmp_path / "h") == [
        {"entry": one.name, "scores": {"t": {"acc,none": 0.5}}, "parity_ok": False},
        {"entry": two.name, "scores": {"t": {"acc,none": 0.5}}, "parity_ok": None}]
    assert read_history(tmp_path / "nothing") == []


def test_the_reference_runs_in_the_servers_precision_on_its_kind_of_device(tmp_path):
    job = EvalJob(url="http://x", checkpoint=str(tmp_path), tasks=("t",))
    assert (job.reference_dtype, job.reference_device) == ("float32", "cpu")
    gpu = job.served_by({"dtype": "bfloat16", "device": "NVIDIA H200"})
    assert (gpu.reference_dtype, gpu.reference_device) == ("bfloat16", "cuda")
    cpu = job.served_by({"dtype": "float32", "device": "cpu"})
    assert (cpu.reference_dtype, cpu.reference_device) == ("float32", "cpu")
