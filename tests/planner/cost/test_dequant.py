"""cost.dequant: DeepSpeed's per-use dequantization of 8/4-bit weights, worked out by hand.

Bytes per element (deepspeed/inference/quantization/utils.py, DeQuantizer.dequantize), c = compute bytes:
torch ops  zeros_like c + copy_ (1 + c) + div_ 2c + add_ 2c = 1 + 6c, plus 4 to unpack 4-bit;
fused      DeepSpeed's for fp16 and 4-bit only, hpi's (Workload.fused_dequant) for any: read bits / 8 bytes
           and the group's scale and minimum (2c / 64), write c.
The toy model (conftest.toy_dense): a dense layer holds 15,204,352 matrix weights (7 matrices); the
embedding and the head 32000 x 1024 each. ROUND: HBM 1 TB/s at dequant_hbm 0.4, 100 us of launches per
layer (40 kernels: 2.5 us each).
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.cost.dequant import (
    dequant_buffer_bytes,
    dequant_bytes_per_elem,
    dequant_elems_per_rank,
    dequant_host_time,
    dequant_kernels,
    dequant_time,
)
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

LAYER_MATRICES = 15_204_352
VOCAB_MATRIX = 32000 * 1024
BITS = np.array([16.0, 8.0, 4.0])


@pytest.mark.parametrize("dtype,want", [
    ("bf16", [0.0, 13.0, 17.0]),
    ("fp16", [0.0, 13.0, 0.5 + 4 / 64 + 2]),  # DeepSpeed's fused kernel is 4-bit only
    ("fp32", [0.0, 25.0, 29.0]),
])
def test_bytes_per_element_follow_deepspeeds_code_path(dtype: str, want: list[float]) -> None:
    np.testing.assert_allclose(dequant_bytes_per_elem(BITS, dtype, False), want)


@pytest.mark.parametrize("dtype,want", [
    ("bf16", [0.0, 1 + 4 / 64 + 2, 0.5 + 4 / 64 + 2]),  # 3.0625 and 2.5625 bytes, against 13 and 17
    ("fp16", [0.0, 3.0625, 2.5625]),
    ("fp32", [0.0, 1 + 8 / 64 + 4, 0.5 + 8 / 64 + 4]),
])
def test_hpis_fused_kernel_reads_the_packed_weight_and_writes_it_once(dtype: str, want: list[float]) -> None:
    np.testing.assert_allclose(dequant_bytes_per_elem(BITS, dtype, True), want)
    np.testing.assert_allclose(dequant_kernels(BITS, dtype, True), [0, 1, 1])
    c = 4 if dtype == "fp32" else 2
    np.testing.assert_allclose(dequant_buffer_bytes(BITS, dtype, True), [0, c, c])  # only the result


def test_kernels_and_buffers_per_dequantization() -> None:
    np.testing.assert_allclose(dequant_kernels(BITS, "bf16", False), [0, 4, 8])
    np.testing.assert_allclose(dequant_kernels(BITS, "fp16", False), [0, 4, 1])
    # the 16-bit result, and for 4-bit on the torch path the unpacked uint8 tensor beside it
    np.testing.assert_allclose(dequant_buffer_bytes(BITS, "bf16", False), [0, 2, 3])
    np.testing.assert_allclose(dequant_buffer_bytes(BITS, "fp16", False), [0, 2, 2])


def test_every_matrix_a_forward_touches_is_dequantized_whole(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(), Plan(weight_bits=8)])
    for phase in (decode_phase(lay, k), prefill_phase(lay, k)):
        elems = dequant_elems_per_rank(lay, k, phase)
        np.testing.assert_allclose(elems[0], 0.0)
        assert elems[1, DENSE] == pytest.approx(LAYER_MATRICES)
        assert elems[1, EMBED] == pytest.approx(VOCAB_MATRIX)  # the whole table, not the rows looked up
        assert elems[1, HEAD] == pytest.approx(VOCAB_MATRIX)


def test_dequant_time_and_launches_by_hand(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(weight_bits=8), Plan(weight_bits=4)])
    t = dequant_time(lay, k, decode_phase(lay, k))
    assert t[0, DENSE] == pytest.approx(LAYER_MATRICES * 13 / (1e12 * 0.4))
    assert t[1, DENSE] == pytest.approx(LAYER_MATRICES * 17 / (1e12 * 0.4))
    host = dequant_host_time(lay, k)
    assert host[0, DENSE] == pytest.approx(7 * 4 * 100e-6 / 40)
    assert host[1, HEAD] == pytest.approx(1 * 8 * 100e-6 / 40)


def test_fp16_takes_the_fused_kernel(kit) -> None:
    lay = kit.arrangement(kit.toy_dense(), workload=Workload(512, 32, compute_dtype="fp16"))
    k = Knobs.from_plans([Plan(weight_bits=4)])
    assert dequant_time(lay, k, decode_phase(lay, k))[0, DENSE] == pytest.approx(
        LAYER_MATRICES * 2.5625 / (1e12 * 0.4))


def test_the_workloads_fused_dequant_prices_hpis_kernel(kit) -> None:
    """bf16, 4-bit, toy dense layer: 2.5625 bytes an element instead of 17, at the kernel's own share of the HBM
    rate (ROUND: fused_dequant_hbm 0.2, DeepSpeed's paths 0.4), one launch per matrix instead of 8."""
    lay = kit.arrangement(kit.toy_dense(), workload=Workload(512, 32, fused_dequant=True))
    k = Knobs.from_plans([Plan(weight_bits=4), Plan(weight_bits=8)])
    t = dequant_time(lay, k, decode_phase(lay, k))
    assert t[0, DENSE] == pytest.approx(LAYER_MATRICES * 2.5625 / (1e12 * 0.2))
    assert t[1, DENSE] == pytest.approx(LAYER_MATRICES * 3.0625 / (1e12 * 0.2))
    assert dequant_host_time(lay, k)[0, DENSE] == pytest.approx(7 * 1 * 100e-6 / 40)


def test_dequantization_adds_to_the_step_in_series_with_the_copy(kit) -> None:
    """Offloaded, PCIe-bound: the 4-bit step is the packed copy plus the dequantization, not their max."""
    lay = kit.arrangement(kit.toy_dense())
    ev = kit.evaluate(lay, [Plan(offload="cpu", weight_bits=4)])
    d = ev.decode.exposed
    t = dequant_time(lay, Knobs.from_plans([Plan(offload="cpu", weight_bits=4)]), decode_phase(lay, ev.knobs))
    want = 4 * t[0, DENSE] + t[0, EMBED] + t[0, HEAD]
    assert d["dequant_s"][0] == pytest.approx(want)
    assert d["weight_fetch_s"][0] > d["dequant_s"][0] > 0
    assert ev.decode.link["dequant_s"][0] == pytest.approx(want)
