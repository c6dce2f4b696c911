"""benchmarks/decode_attention_bench.py on the CPU: the kernels in Triton's interpreter, every grid size beside sdpa."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.benchmarks.scripts import run_triton_script

pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernels' CPU run is Triton's interpreter")


def _run(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    return run_triton_script("decode_attention_bench", *args, interpret=interpret)


def test_each_grid_matches_sdpa_and_the_splits_follow_the_target(tmp_path):
    out = tmp_path / "attn.json"
    proc = _run("--device", "cpu", "--batches", "1,4", "--targets", "4,16", "--heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--slots", "256", "--position", "100", "--replays", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["kernel"], r.get("target_programs")) for r in rows] == [
        (1, "sdpa", None), (1, "split_kv", 4), (1, "split_kv", 16),
        (4, "sdpa", None), (4, "split_kv", 4), (4, "split_kv", 16)]
    # 4 blocks of 64 slots; batch 1 x 2 KV heads = 2 pairs: 2 and 4 splits (at most a block each); batch 4: 1 and 2
    assert [r["splits"] for r in rows if r["kernel"] == "split_kv"] == [2, 4, 1, 2]
    for r in rows:
        assert r["max_abs_err"] < 1e-4, r  # fp32 on the CPU: the same attention as sdpa
        assert r["timer"] == "perf_counter" and r["us_per_call"] > 0
        assert r["kv_bytes"] == 2 * r["batch"] * 2 * 101 * 16 * 4  # keys and values of slots 0..100, fp32


def test_bad_arguments_get_one_line_and_exit_2():
    proc = _run("--device", "cpu", "--heads", "6", "--kv-heads", "4")
    assert proc.returncode == 2 and "heads(6) % kv_heads(4) != 0" in proc.stderr
    proc = _run("--device", "cpu", "--position", "1024", "--slots", "1024")
    assert proc.returncode == 2 and "position 1024 not in [0, slots(1024))" in proc.stderr
    proc = _run("--device", "cpu", interpret=False)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
    proc = _run("--batches", "0,2", "--device", "cpu")
    assert proc.returncode == 2 and "positive integers" in proc.stderr
    proc = _run("--positions=-1,5", "--device", "cpu")
    assert proc.returncode == 2 and "give integers >= 0" in proc.stderr
    proc = _run("--walks", "masked,skipping", "--device", "cpu")
    assert proc.returncode == 2 and "give walks among masked, bounded, masked_trimmed, trimmed" in proc.stderr


def test_the_launch_sweep_times_every_block_with_every_target_and_puts_the_module_back(tmp_path):
    """--blocks / --warps / --stages: every combination with every target, each still sdpa's attention; the blocks
    set the splits (at most one a block of the cache)."""
    out = tmp_path / "attn.json"
    proc = _run("--device", "cpu", "--batches", "2", "--targets", "16", "--blocks", "32,64", "--warps", "4",
                "--stages", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--slots", "256",
                "--position", "200", "--replays", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "split_kv"]
    assert [(r["block"], r["warps"], r["stages"], r["splits"]) for r in rows] == [(32, 4, 2, 4), (64, 4, 2, 4)]
    assert all(r["max_abs_err"] < 1e-4 for r in rows)


def test_each_walk_gets_its_row_on_the_same_inputs(tmp_path):
    """--walks <hpi's walk>,masked: a row per walk of pass 1 (the module's ``WALK``) at each position, every one
    sdpa's attention (at position 70 the second of 2 splits has no allowed slot: a trimmed walk reads no block)."""
    from hpi.executor.decode_attention import WALK

    other = "masked" if WALK != "masked" else "trimmed"
    out = tmp_path / "attn.json"
    proc = _run("--device", "cpu", "--batches", "2", "--targets", "8", "--walks", f"{WALK},{other}", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--slots", "256", "--positions", "70,200", "--replays", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "split_kv"]
    assert [(r["position"], r["walk"]) for r in rows] == [(70, WALK), (70, other), (200, WALK), (200, other)]
    assert all(r["splits"] == 2 and r["walk_launched"] == r["walk"] for r in rows)  # splits of 2 blocks: trimmed
    assert all(r["max_abs_err"] < 1e-4 for r in rows)
    # side by side: each row over the module's own walk at its position, measured in the same process
    assert [r["over_default_walk"] for r in rows][::2] == [1.0, 1.0]
    for own, theirs in (rows[:2], rows[2:]):
        assert theirs["over_default_walk"] == round(theirs["us_per_call"] / own["us_per_call"], 3)


def test_a_walk_list_without_the_modules_own_gives_no_ratio(tmp_path):
    """Rows are compared only with the module's own walk measured in the same run: without it, no ratio. One split
    a (row, KV head) pair of 2 blocks here, so each walk runs as named."""
    from hpi.executor.decode_attention import WALK, WALKS

    others = [w for w in WALKS if w != WALK][:2]
    out = tmp_path / "attn.json"
    proc = _run("--device", "cpu", "--batches", "1", "--targets", "2", "--walks", ",".join(others), "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--slots", "128", "--positions", "70", "--replays", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "split_kv"]
    assert [r["walk"] for r in rows] == [r["walk_launched"] for r in rows] == others
    assert all(r.get("over_default_walk") is None for r in rows)


def test_each_position_gets_its_rows_and_they_match_sdpa(tmp_path):
    """--positions 10,150: every grid at each position of the one cache, its bytes those of the attended slots (at
    position 10 the second of 2 splits has no slot)."""
    out = tmp_path / "attn.json"
    proc = _run("--device", "cpu", "--batches", "4", "--targets", "16", "--positions", "10,150", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--slots", "256", "--replays", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["position"], r["kernel"], r.get("splits")) for r in rows] == [
        (10, "sdpa", None), (10, "split_kv", 2), (150, "sdpa", None), (150, "split_kv", 2)]
    assert all(r["max_abs_err"] < 1e-4 for r in rows)
    assert [r["kv_bytes"] for r in rows] == [2 * 4 * 2 * 11 * 16 * 4] * 2 + [2 * 4 * 2 * 151 * 16 * 4] * 2
