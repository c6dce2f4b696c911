#!/usr/bin/env bash
# Set up a development environment: the planner, its tests, and the executor's CPU stack.
#
# torch is installed explicitly as the 2.13.0 CPU build *before* anything that depends on it, so
# that no package pulls a multi-GB CUDA build. DeepSpeed builds no ops (DS_BUILD_OPS=0): the tests
# run it on its CPU accelerator (DS_ACCELERATOR=cpu) with the gloo backend.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
# hpi's Triton kernels (decode attention, dequantization) run on the CPU in Triton's interpreter for their tests
# (TRITON_INTERPRET=1, or an interpreted copy for CPU tensors). 3.6.0: the Triton of the GPU device's torch 2.11,
# so the tests see the API that runs there.
"$PY" -m pip install -q --disable-pip-version-check "triton==3.6.0"
DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check -e '.[test,executor,serve,eval]'
# NVMe offload goes through DeepSpeed's async_io op, which links libaio. Install it where we may (root with
# apt); elsewhere the NVMe tests skip themselves and say why.
if ! ldconfig -p 2>/dev/null | grep -q 'libaio\.so '; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq libaio-dev >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libaio-dev >/dev/null 2>&1; }) \
      || echo "dev setup: could not install libaio-dev; NVMe offload tests will skip"
  else
    echo "dev setup: libaio missing (apt install libaio-dev); NVMe offload tests will skip"
  fi
fi
# tests/serve/test_prometheus.py starts a real Prometheus server (Debian's prometheus package, which brings promtool
# for tests/serve/test_dashboard.py). Install it where we may (root with apt); elsewhere those tests skip and say why.
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null 2>&1; }) \
      || echo "dev setup: could not install prometheus; the Prometheus scrape test will skip"
  else
    echo "dev setup: prometheus missing (apt install prometheus); the Prometheus scrape test will skip"
  fi
fi
# DeepSpeed JIT-compiles its CPU shared-memory comm op (~100 s on 2 cores) the first time a CPU
# engine starts; build it here, once, so test timings stay honest. Cached under ~/.cache/torch_extensions.
DS_ACCELERATOR=cpu "$PY" - <<'PY'
import torch, transformers, deepspeed  # noqa: F401  (fail here, not halfway through the tests)
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
# NVMe offload's async_io op (~6 min on 2 cores the first time): built here, once, when libaio is present.
from deepspeed.ops.op_builder import AsyncIOBuilder
if AsyncIOBuilder().is_compatible(verbose=False):
    AsyncIOBuilder().load(verbose=False)
print(f"dev setup ok: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY
