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
DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check -e '.[test,executor]'
"$PY" - <<'PY'
import torch, transformers, deepspeed  # noqa: F401  (fail here, not halfway through the tests)
print(f"dev setup ok: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY
