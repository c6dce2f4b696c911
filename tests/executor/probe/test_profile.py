"""hpi.executor.probe.profile: the hardware profile built from a measurement document loads in the planner,
compiles to the topology the measurements describe, and says where each figure comes from."""

from __future__ import annotations

import pytest

from hpi.cli import main
from hpi.executor.probe import default_profile_name
from hpi.planner.profiles import load_profile
from hpi.planner.topology import build_topology


def test_default_profile_name():
    assert default_profile_name("gpu-node-7.cluster.local") == "probed-gpu-node-7"
    assert default_profile_name("My Box!") == "probed-my-box"


def test_four_h200_on_nvswitch_becomes_a_loadable_profile(tmp_path, capsys, fake_doc, load_built):
    profile = load_built(fake_doc(4, "h200x4_nvswitch.txt", sockets=2))
    assert profile.n_gpus == 4 and profile.gpu.name == "NVIDIA H200" and profile.host.sockets == 2
    assert profile.gpu.bf16_flops == 806e12 and profile.gpu.int8_flops == 1500e12
    assert profile.host.h2d_pageable_bytes_s == 8.3e9 and profile.nvme.read_bytes_s == 1.28e9
    topology = build_topology(profile)
    assert len(topology.islands()) == 1  # one NVSwitch island
    assert topology.group_link(topology.gpus).kind == "nvswitch"
    assert topology.host_to_gpu_bytes_s(topology.gpus)["n0.gpu0"] == pytest.approx(55.2e9)
    assert topology.home_cpu("n0.gpu3") == "n0.cpu1"
    eff = profile.efficiency  # 256 MB in 896 us over 4 GPUs: 449 GB/s bus bandwidth of 450 GB/s per GPU
    assert eff.collective_bandwidth == pytest.approx(268435456 / 896e-6 * 1.5 / 450e9, rel=1e-3)
    assert eff.allreduce_latency_s == pytest.approx(49e-6)
    for path, prov in profile.provenance.items():
        assert prov.source in ("probed", "assumed", "datasheet"), path
        assert prov.note, path
    assert profile.provenance["gpu.bf16_flops"].source == "probed"
    assert "2026-11-22" in profile.provenance["gpu.bf16_flops"].note
    code = main(["plan", "--model", "llama-3-70b", "--hardware", str(tmp_path / "probed-test.yaml"), "--top", "2"])
    assert code == 0, capsys.readouterr().err


def test_two_h200_profile_matches_the_hand_written_one(fake_doc, load_built):
    built = load_built(fake_doc(2, "h200x2.txt"))
    shipped = load_profile("h200-2gpu")
    assert built.gpu.memory_bytes == shipped.gpu.memory_bytes and built.gpu.bf16_flops == shipped.gpu.bf16_flops
    t_built, t_shipped = build_topology(built), build_topology(shipped)
    assert t_built.group_link(t_built.gpus).bandwidth_bytes_s == t_shipped.group_link(t_shipped.gpus).bandwidth_bytes_s
    assert built.efficiency.collective_bandwidth == pytest.approx(shipped.efficiency.collective_bandwidth, abs=0.01)


def test_shared_pcie_switch_gets_the_measured_uplink(fake_doc, load_built):
    profile = load_built(fake_doc(4, "pcie_4gpu.txt", together=20e9, sockets=2))
    topology = build_topology(profile)
    rates = topology.host_to_gpu_bytes_s(topology.gpus)
    assert rates["n0.gpu0"] == pytest.approx(20e9)  # the two GPUs behind pcie0 split its 40 GB/s uplink
    assert rates["n0.gpu2"] == pytest.approx(55.2e9)  # PHB: each on its own root port
    assert profile.raw["node"]["pcie_switches"] == 1


def test_failed_measurements_fall_back_to_assumed_figures_that_say_so(fake_doc, load_built):
    doc = fake_doc(1, None)
    del doc["matmul"], doc["hbm"], doc["copies"]
    doc["errors"] = {"matmul": "RuntimeError: CUDA error"}
    profile = load_built(doc)
    assert profile.provenance["gpu.bf16_flops"].source == "assumed"
    assert "CUDA error" in profile.provenance["gpu.bf16_flops"].note
    assert profile.efficiency.collective_bandwidth == 0.80  # no NCCL figure: the default


def test_profile_and_probe_json_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch, fake_doc):
    """NAME.yaml and NAME.probe.json go through hpi.atomic: a write stopped midway keeps the old files."""
    from hpi import atomic
    from hpi.executor.probe import build_profile, measurements_path, write_measurements, write_profile

    doc = fake_doc(2, "h200x2.txt")
    path = tmp_path / "box.yaml"
    write_profile(build_profile(doc, "box"), path, header="first")
    write_measurements({"first": True}, measurements_path(path))
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(before) == ["box.probe.json", "box.yaml"]

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_profile(build_profile(doc, "box"), path, header="second")
    with pytest.raises(KeyboardInterrupt):
        write_measurements({"second": True}, measurements_path(path))
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before  # no half file, no temporary left


def test_the_disks_read_grid_reaches_the_profile_and_prices_aio(fake_doc, load_built):
    """The probe's grid becomes nvme.read_grid (probed, with its method); a document without one (an older
    probe, or a filesystem that refused O_DIRECT) gives a profile without it, as before."""
    assert load_built(fake_doc(1, None)).nvme.read_grid == ()
    doc = fake_doc(1, None)
    doc["disk"]["read_grid"] = [[1048576.0, 1.0, 0.9e9], [1048576.0, 32.0, 3.1e9], [4194304.0, 8.0, 3.3e9]]
    profile = load_built(doc)
    assert [(p.request_bytes, p.in_flight, p.read_bytes_s) for p in profile.nvme.read_grid] == [
        (1048576.0, 1.0, 0.9e9), (1048576.0, 32.0, 3.1e9), (4194304.0, 8.0, 3.3e9)]
    prov = profile.provenance["nvme.read_grid"]
    assert prov.source == "probed" and "O_DIRECT" in prov.note and "one thread per request" in prov.note
