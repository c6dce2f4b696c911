"""``hpi probe``: measure this machine and write a hardware profile (``hpi.planner.profiles`` schema).

    doc = run_probe(ProbeSettings.full(), nvme_path="/mnt/nvme", step=...)       # the raw measurements
    profile = build_profile(doc, name="my-box")                                  # a profile dict
    write_profile(profile, Path("hardware_profiles/my-box.yaml"))
    write_measurements(doc, measurements_path(Path("hardware_profiles/my-box.yaml")))   # my-box.probe.json

One module per thing measured, each with its pure helpers (text and numbers in, data out; unit-tested on
CPU with fixtures) beside its measurements (torch, subprocesses, files; torch is imported inside them
only, so importing this package stays cheap and ``hpi probe`` works on a machine without torch or GPU):

- ``settings``: how hard to measure (``ProbeSettings``);
- ``tools``: ``nvidia-smi topo -m`` / NVML / ``nvidia-smi`` / ``lscpu`` output parsed (``parse_topo``,
  ``gpu_topology``, ``gather_gpus``) and ``run_command``;
- ``host``: the OS, memory, CPUs and pinning limits, and pinned/pageable host<->device copies;
- ``kernels``: matmuls, the HBM copy, a decode GEMV, a tiny kernel in a CUDA graph, real decoder layers in
  graphed decode (``time_layers``) and their cost fit (``fit_layer_cost``);
- ``collectives``: NCCL all-reduce for every group size, eager and CUDA-graphed;
- ``disk``: the offload directory's filesystem and conventions, and its O_DIRECT rates (sequential, and by
  request size and requests in flight: the profile's ``nvme.read_grid``);
- ``figures``, ``efficiency``, ``profile``: the profile dict from the measurements, its YAML and
  ``NAME.probe.json``;
- ``run``: ``run_probe``, every step in turn.

Every figure in the written profile is ``source: probed`` with the date and the method in its note, or
``assumed``/``datasheet`` where nothing here can measure it (inter-socket links, NVLink per-link rate,
the share of DRAM the OS keeps). The raw document (``NAME.probe.json``) keeps every repeat's median, the
alone and together copy figures, every all-reduce size and group size, so a number can be traced.
"""

from hpi.executor.probe.collectives import GRAPHED_CALLS, GRAPHED_MAX_BYTES, measure_allreduce
from hpi.executor.probe.disk import (
    PathAdvice,
    ReadGrid,
    classify_path,
    measure_disk,
    measure_read_grid,
    mount_fs_type,
    os_note,
)
from hpi.executor.probe.efficiency import HOST_BOUND_RATIO, layer_figures
from hpi.executor.probe.host import detect_os, gather_host, gather_os, measure_copies, memlock_limits, pin_trial
from hpi.executor.probe.kernels import (
    LayerFit,
    fit_layer_cost,
    measure_decode_kernels,
    measure_decoder_layers,
    measure_hbm,
    measure_matmul,
    time_layers,
)
from hpi.executor.probe.profile import (
    build_profile,
    check_profile_name,
    default_profile_name,
    measurements_path,
    write_measurements,
    write_profile,
)
from hpi.executor.probe.run import run_probe
from hpi.executor.probe.settings import PROBE_VERSION, ProbeSettings
from hpi.executor.probe.tools import (
    GpuTopology,
    TopoMatrix,
    gather_gpus,
    gpu_topology,
    nvlink_link_bytes_s,
    parse_lscpu,
    parse_smi_query,
    parse_topo,
    run_command,
)

__all__ = [
    "PROBE_VERSION",
    "ProbeSettings",
    # tools
    "TopoMatrix",
    "GpuTopology",
    "parse_topo",
    "gpu_topology",
    "nvlink_link_bytes_s",
    "parse_lscpu",
    "parse_smi_query",
    "run_command",
    "gather_gpus",
    # host
    "detect_os",
    "gather_os",
    "gather_host",
    "memlock_limits",
    "pin_trial",
    "measure_copies",
    # disk
    "mount_fs_type",
    "classify_path",
    "PathAdvice",
    "os_note",
    "measure_disk",
    "measure_read_grid",
    "ReadGrid",
    # kernels and layers
    "measure_matmul",
    "measure_hbm",
    "measure_decode_kernels",
    "measure_decoder_layers",
    "time_layers",
    "LayerFit",
    "fit_layer_cost",
    "layer_figures",
    # collectives
    "GRAPHED_CALLS",
    "GRAPHED_MAX_BYTES",
    "HOST_BOUND_RATIO",
    "measure_allreduce",
    # the profile
    "default_profile_name",
    "check_profile_name",
    "build_profile",
    "write_profile",
    "measurements_path",
    "write_measurements",
    "run_probe",
]
