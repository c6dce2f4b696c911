"""hpi.executor.probe.tools: ``nvidia-smi topo -m`` parsed from real-format fixtures into how the GPUs are linked,
and the lscpu / nvidia-smi query parsers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpi.executor.probe import gpu_topology, nvlink_link_bytes_s, parse_lscpu, parse_smi_query, parse_topo

DATA = Path(__file__).resolve().parents[1] / "data" / "topo"


def topo(name: str):
    return parse_topo((DATA / name).read_text())


def test_two_h200_joined_by_nv18():
    t = topo("h200x2.txt")
    assert t.gpus == ("GPU0", "GPU1")
    assert t.code("GPU0", "GPU1") == "NV18" and t.code("GPU0", "GPU0") == "X"
    assert t.affinity["GPU1"]["CPU Affinity"] == "0-31" and t.numa_node("GPU1") == 0
    topology = gpu_topology(t, 2, gpu_name="NVIDIA H200")
    assert topology.nvlink_pairs == ((0, 1, 18),) and topology.nvswitch_links == 0 and topology.switch_groups == ()


def test_nv18_among_four_gpus_is_an_nvswitch_and_numa_gives_the_socket():
    topology = gpu_topology(topo("h200x4_nvswitch.txt"), 4, sockets=2, numa_nodes=2, gpu_name="NVIDIA H200")
    assert topology.nvswitch_links == 18 and topology.nvlink_pairs == ()  # 18 * 3 links > 18 per GPU
    assert topology.gpu_socket == (0, 0, 1, 1)


def test_dgx_with_nic_columns():
    t = topo("dgx_h100_8gpu.txt")
    assert t.gpus == tuple(f"GPU{i}" for i in range(8)) and "NIC1" in t.devices
    assert t.code("GPU0", "NIC0") == "PXB" and t.code("NIC1", "GPU7") == "PXB"
    topology = gpu_topology(t, 8, sockets=2, numa_nodes=2, gpu_name="NVIDIA H100 80GB HBM3")
    assert topology.nvswitch_links == 18 and topology.gpu_socket == (0, 0, 0, 0, 1, 1, 1, 1)


def test_pcie_only_machine_groups_gpus_behind_a_switch():
    topology = gpu_topology(topo("pcie_4gpu.txt"), 4, sockets=2, numa_nodes=2)
    assert topology.switch_groups == ((0, 1),)  # PIX; PHB and SYS go through the host
    assert not topology.has_nvlink and topology.gpu_socket == (0, 0, 1, 1)


def test_nvlink_bridged_pairs_stay_pairs():
    topology = gpu_topology(topo("a100_pcie_nvlink_pairs_4gpu.txt"), 4, gpu_name="NVIDIA A100-PCIE-40GB")
    assert topology.nvlink_pairs == ((0, 1, 4), (2, 3, 4)) and topology.nvswitch_links == 0


def test_topology_that_disagrees_with_the_gpu_count_is_ignored():
    topology = gpu_topology(topo("h200x2.txt"), 3)
    assert topology.nvlink_pairs == () and topology.gpu_socket == (0, 0, 0)


def test_garbage_topology_names_the_problem():
    with pytest.raises(ValueError, match="no header"):
        parse_topo("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    with pytest.raises(ValueError, match="unknown link code"):
        parse_topo("\tGPU0\tGPU1\nGPU0\t X \tFOO\nGPU1\tFOO\t X \n")


def test_nvlink_generations():
    assert nvlink_link_bytes_s("NVIDIA H200") == 25e9 and nvlink_link_bytes_s("NVIDIA B200") == 50e9


def test_lscpu_and_nvidia_smi_query():
    assert parse_lscpu("CPU(s):   64\nSocket(s):  2\nNUMA node(s):   4\nModel name: X\n") == {
        "cpus": 64, "sockets": 2, "numa_nodes": 4}
    gpus = parse_smi_query("0, NVIDIA H200, 143771, 570.86.15\n1, NVIDIA H200, 143771, 570.86.15\n")
    assert [g["name"] for g in gpus] == ["NVIDIA H200"] * 2 and gpus[1]["memory_bytes"] == 143771 * 2**20
