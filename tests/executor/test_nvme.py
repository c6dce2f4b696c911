"""NVMe offload on the CPU: DeepSpeed's real async_io path (libaio), the same tokens as CPU offload, and the
record's NVMe figures. bf16: DeepSpeed 0.19.8 cannot swap fp32 weights (RunSpec refuses that pairing)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402


def _aio_available() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


pytestmark = pytest.mark.skipif(not _aio_available(),
                                reason="libaio missing: apt install libaio-dev (scripts/dev-setup.sh does)")

WORKLOAD = Workload(prompt_len_tokens=10, gen_len_tokens=4)
# tiny-llama: only tensors of at least one aio block (1 MiB) go to NVMe (DeepSpeed's min_aio_bytes): the
# embedding and the LM head, 32000 x 64 bf16 each; the small layer weights stay in CPU memory.
NVME_BYTES_PER_STEP = 2 * 32000 * 64 * 2


def _spec(tmp_path, offload: str, name: str) -> RunSpec:
    plan = Plan(offload=offload, pin_memory=False, batch_size=2)
    return RunSpec(plan=plan, model="tiny-llama", workload=WORKLOAD, device="cpu", dtype="bf16",
                   out_dir=str(tmp_path / name), nvme_path=str(tmp_path / "nvme") if offload == "nvme" else None)


def test_nvme_offload_matches_cpu_offload_and_reports_its_reads(tmp_path):
    cpu = launch(_spec(tmp_path, "cpu", "cpu"), timeout_s=300).to_json()
    nvme = launch(_spec(tmp_path, "nvme", "nvme"), timeout_s=300).to_json()
    assert nvme["tokens"] == cpu["tokens"]
    assert cpu["nvme"] is None
    figures = nvme["nvme"]
    assert figures["bytes_per_step"] == NVME_BYTES_PER_STEP
    assert nvme["h2d"]["bytes_per_step"] == cpu["h2d"]["bytes_per_step"]  # every partition still crosses to the device
    assert figures["achieved_read_bytes_s"] == pytest.approx(NVME_BYTES_PER_STEP / nvme["decode_step_s"]["median"])
    assert figures["aio"]["queue_depth"] == 64
    if figures["device"] is None:  # e.g. /tmp on tmpfs or overlayfs: said, not invented
        assert "no block device" in figures["why_no_device_figures"]
    else:
        assert figures["device_read_bytes"] >= 0 and figures["device_avg_queue_depth"] >= 0


def test_nvme_with_fp32_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="use --dtype bf16 or fp16"):
        RunSpec(plan=Plan(offload="nvme"), model="tiny-llama", device="cpu", dtype="fp32", nvme_path=str(tmp_path))


def test_the_plans_aio_settings_reach_deepspeed_and_change_no_token(tmp_path):
    """A 2 MiB block (under tiny-llama's 3.9 MiB embedding, the smallest swapped tensor), 4 requests per thread and
    2 threads: DeepSpeed's aio handle takes them (a thread count that does not divide a read would fail it), the
    record keeps them, and the tokens are CPU offload's."""
    plan = Plan(offload="nvme", pin_memory=False, batch_size=2, aio_block_size_bytes=2 << 20, aio_queue_depth=4,
                aio_threads=2)
    spec = RunSpec(plan=plan, model="tiny-llama", workload=WORKLOAD, device="cpu", dtype="bf16",
                   out_dir=str(tmp_path / "aio"), nvme_path=str(tmp_path / "nvme"))
    nvme = launch(spec, timeout_s=300).to_json()
    cpu = launch(_spec(tmp_path, "cpu", "cpu"), timeout_s=300).to_json()
    assert nvme["tokens"] == cpu["tokens"]
    aio = nvme["nvme"]["aio"]
    assert (aio["block_size"], aio["queue_depth"], aio["intra_op_parallelism"]) == (2 << 20, 4, 2)
    assert nvme["nvme"]["bytes_per_step"] == NVME_BYTES_PER_STEP  # the same tensors swapped as at 1 MiB
