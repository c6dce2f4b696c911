"""benchmarks/layer_scaling.py: the KV bytes it reports, and a CPU run of its grid through the probe's path."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import load


def _module():
    return load("layer_scaling")


def test_kv_bytes_of_one_llama_3_8b_layer():
    # keys and values, 8 kv heads of 128, bf16: 4 KiB per token per layer
    assert _module().kv_bytes_per_layer("llama-3-8b", batch=16, context=543) == 16 * 543 * 4096


@pytest.mark.filterwarnings("ignore")
def test_grid_runs_on_cpu_and_writes_every_cell(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert _module().main(["--out", str(tmp_path), "--model", "tiny-llama", "--batches", "1,2", "--prompts", "4,8",
                           "--gen-len", "3", "--reps", "1"]) == 0
    doc = json.loads((tmp_path / "layer_scaling.json").read_text())
    assert doc["kind"] == "hpi.LayerScaling" and doc["counts"] == [2, 6]
    cells = {(c["batch"], c["prompt_len"]): c for c in doc["cells"]}
    assert set(cells) == {(1, 4), (2, 4), (1, 8), (2, 8)}
    # tiny-llama: 2 kv heads of 16, fp32 on the CPU; the last step reads prompt + gen - 1 tokens
    assert cells[(2, 8)]["kv_bytes_last_step"] == 2 * 2 * (8 + 3 - 1) * 2 * 16 * 4
    assert all(c["layer_bytes"] == cells[(1, 4)]["layer_bytes"] for c in cells.values())
