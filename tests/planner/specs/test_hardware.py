"""specs.hardware: the usable GPU memory and DRAM, written once and read by every limit."""

from __future__ import annotations

import pathlib
import re

import hpi
from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload


def test_usable_memory_is_the_usable_fraction_of_the_capacity() -> None:
    hw = load_profile("a6000-workstation")
    assert hw.usable_gpu_bytes == hw.gpu.memory_bytes * hw.efficiency.gpu_memory_usable
    assert hw.usable_dram_bytes == hw.host.dram_bytes * hw.efficiency.dram_usable
    assert 0 < hw.usable_gpu_bytes < hw.gpu.memory_bytes and 0 < hw.usable_dram_bytes < hw.host.dram_bytes


def test_the_gpu_limit_and_its_message_use_the_usable_bytes() -> None:
    hw = load_profile("a6000-workstation")
    est = predict(load_model("llama-3-70b"), hw, Workload(), Plan())
    assert est.gpu_peak_bytes > hw.usable_gpu_bytes and not est.feasible
    assert f"> {hw.usable_gpu_bytes / 1e9:.1f} GB usable" in est.reasons[0].message
    fits = predict(load_model("llama-3-70b"), hw, Workload(), Plan(offload="cpu", weight_bits=4))
    assert fits.feasible and fits.gpu_peak_bytes <= hw.usable_gpu_bytes and fits.cpu_bytes <= hw.usable_dram_bytes


def test_no_module_recomputes_usable_memory() -> None:
    src = pathlib.Path(hpi.__file__).parent
    recomputed = re.compile(r"\*\s*[\w.]*(gpu_memory_usable|dram_usable)")
    offenders = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py") if p.name != "hardware.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if recomputed.search(line)]
    assert offenders == []
