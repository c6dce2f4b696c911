#!/usr/bin/env bash
# Issue 20, NVMe: the drive's O_DIRECT read grid, then the 8B streamed from that drive at three aio settings.
#   bash benchmarks/aio_device.sh OUT_DIR [ENTRIES]   # ENTRIES: gpu_matrix --only list (default: all three)
# Needs DeepSpeed on the image (../shared/tools/device-wheels.sh: carry .whl) and libaio (carry .deb: the
# bookworm libaio1 + libaio-dev debs, benchmarks/device_libaio.sh). DeepSpeed's async_io op JIT-builds on the
# first NVMe run (~1 min on 16 cores; torch's extension cache keeps it while the machine stays warm).
set -uo pipefail
cd "$(dirname "$0")/.."
O=${1:?OUT_DIR}
ONLY=${2:-}
mkdir -p "$O"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16  # the image's 9.0a breaks DeepSpeed's JIT builder
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
fi
mkdir -p /tmp/hpi-path && ln -sfn "$PWD/src" /tmp/hpi-path/hpi
export PYTHONPATH=/tmp/site:/tmp/hpi-path
# shellcheck source=/dev/null
source benchmarks/device_libaio.sh .deb 2>>"$O/steps.log"
NVME=/root/hpi-nvme  # the VM's disk (the root filesystem: /tmp may be tmpfs, which refuses O_DIRECT)
python3 benchmarks/aio_probe.py --base h200-1gpu --nvme-path "$NVME/probe" --name h200-1gpu-aio --out "$O" \
  2>&1 | tee -a "$O/steps.log"
python3 benchmarks/gpu_matrix.py --matrix aio-h200 --hardware h200-1gpu-aio --out "$O" --work "$NVME/runs" \
  ${ONLY:+--only "$ONLY"} 2>&1 | tee -a "$O/steps.log"
rm -rf "$NVME"
