"""hpi.executor.record: the NVMe figures of a RunRecord against the profile's NVMe read share."""

from __future__ import annotations

import pytest

from hpi.executor.record import RankReport, build_record
from hpi.records import ModelInfo, RunRecord

GB = 1e9


def _report(rank: int, nvme_bytes: int) -> RankReport:
    # 1 s prefill, then decode steps of 2 s each
    return RankReport(rank=rank, coords=(rank, 0, 0), device_name="NVIDIA H100", forward_end_s=[1.0, 3.0, 5.0, 7.0],
                      busy_s=[1.0, 2.0, 2.0, 2.0], h2d_bytes_per_forward=nvme_bytes, nvme_bytes_per_forward=nvme_bytes,
                      nvme_device="nvme0n1", nvme_read_bytes=3 * nvme_bytes, nvme_read_interval_s=6.0,
                      nvme_avg_queue_depth=24.0, tokens=[[1, 2, 3, 4]] if rank == 0 else [])


def _spec(offload: str) -> dict:
    return {"plan": {"offload": offload, "batch_size": 1, "micro_batches": 1}, "device": "cuda",
            "hardware": "h100-sxm-1gpu"}


def _record(offload: str, prediction: dict | None) -> RunRecord:
    return build_record(_spec(offload), [_report(0, int(4 * GB))], [[1, 2, 3, 4]], prediction, 54e9, ModelInfo("m"))


def test_nvme_read_is_set_against_the_placements_nvme_share():
    prediction = {"placement": {"nvme_read_bytes_s": 2.5 * GB}, "prefill_s": 1.0, "decode_step_s": 1.5}
    record = _record("nvme", prediction)
    assert RunRecord.from_json(record.to_json()) == record
    figures = record.to_json()["nvme"]  # the figures as record.json carries them
    assert figures["bytes_per_step"] == 4 * GB
    assert figures["achieved_read_bytes_s"] == pytest.approx(2 * GB)  # 4 GB per 2 s step
    assert figures["profile_read_bytes_s"] == 2.5 * GB
    assert figures["fraction_of_profile"] == pytest.approx(0.8)
    assert figures["device_read_bytes_s"] == pytest.approx(2 * GB)  # 12 GB read over 6 s by the drive


def test_nvme_fraction_is_absent_without_a_prediction_and_figures_absent_without_nvme():
    figures = _record("nvme", None).transfers.nvme
    assert figures.profile_read_bytes_s is None and figures.fraction_of_profile is None
    assert _record("cpu", None).transfers.nvme is None


def test_the_record_keeps_the_aio_settings_the_plan_asked_for():
    """The worker renders DeepSpeed's aio section from the run's plan (render.aio_config); the record says the same,
    and a plan from before the aio knobs ran at their defaults."""
    from hpi.executor.render import AIO_DEFAULTS

    spec = _spec("nvme")
    spec["plan"].update(aio_block_size_bytes=4 << 20, aio_queue_depth=8, aio_threads=1)
    record = build_record(spec, [_report(0, int(4 * GB))], [[1, 2, 3, 4]], None, 54e9, ModelInfo("m"))
    assert record.transfers.nvme.aio == {"block_size": 4 << 20, "queue_depth": 8, "intra_op_parallelism": 1,
                                         "single_submit": False, "overlap_events": True, "use_gds": False}
    assert _record("nvme", None).transfers.nvme.aio == AIO_DEFAULTS
