"""The drive's O_DIRECT read grid, written into a copy of a hardware profile, for the aio-h200 matrix.

    python benchmarks/aio_probe.py --base h200-1gpu --nvme-path DIR --name h200-1gpu-aio [--out DIR]

Runs ``hpi probe``'s disk measurement (hpi.executor.probe.disk.measure_disk with the full probe's read grid) in
DIR, then writes hardware_profiles/NAME.yaml: the base profile with ``nvme.read_bytes_s`` and the disk link set
to this run's sequential read and ``nvme.read_grid`` added, so the planner prices aio settings on this drive
(hpi.planner.cost.aio). A copy of the profile and the raw measurement go to --out. The last stdout line is one
JSON document: the grid and how long it took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from hpi.executor.probe.disk import measure_disk
from hpi.executor.probe.profile import read_grid_section, write_profile
from hpi.executor.probe.settings import ProbeSettings
from hpi.planner.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="h200-1gpu")
    parser.add_argument("--nvme-path", required=True)
    parser.add_argument("--name", default="h200-1gpu-aio")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    settings = ProbeSettings.full()
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    disk = measure_disk(args.nvme_path, settings.disk_file_bytes, settings.disk_block_bytes, settings.disk_read_grid)
    disk["seconds"] = time.perf_counter() - started
    if not disk.get("read_grid"):
        raise SystemExit(f"no read grid measured at {args.nvme_path} (O_DIRECT refused?): {disk}")
    date = time.strftime("%Y-%m-%d")
    raw = yaml.safe_load((REPO / "hardware_profiles" / f"{args.base}.yaml").read_text())
    note = (f"O_DIRECT sequential read, {disk['file_bytes'] >> 20} MiB in {disk['block_bytes'] >> 20} MiB blocks at "
            f"{disk['path']}, {date} (benchmarks/aio_probe.py)")
    read = {"value": float(f"{disk['read_bytes_s']:.4g}"), "source": "probed", "note": note}
    raw["name"] = args.name
    raw["description"] = f"{raw.get('description', args.base)}; NVMe read grid probed {date}"
    raw["nvme"]["read_bytes_s"] = read
    raw["nvme"].update(read_grid_section(disk, date))
    for link in (raw.get("node") or {}).get("links", {}).values():
        if ["nvme0", "cpu0"] in link.get("pairs", []):
            link["bandwidth_bytes_s"] = read
    path = REPO / "hardware_profiles" / f"{args.name}.yaml"
    write_profile(raw, path, header=f"{args.base} with this drive's read grid: benchmarks/aio_probe.py, {date}")
    load_profile(args.name)  # it must load
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_text(path.read_text())
        (out / "aio_probe.json").write_text(json.dumps(disk, indent=1))
    for request, in_flight, rate in disk["read_grid"]:
        print(f"request {int(request) >> 20:3d} MiB x {int(in_flight):4d} in flight: {rate / 1e9:6.2f} GB/s")
    print(json.dumps({"profile": str(path), "sequential_read_bytes_s": disk["read_bytes_s"],
                      "read_grid": disk["read_grid"], "grid_seconds": disk.get("read_grid_seconds"),
                      "disk_seconds": disk["seconds"]}))


if __name__ == "__main__":
    main()
