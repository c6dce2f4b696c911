#!/usr/bin/env bash
# The serving measurements of benchmarks/results/2026-12-02-h200-serve, one phase per device call:
#   bash benchmarks/serve_device.sh setup             # wheels carried in ../.whl (shared/tools/device-wheels.sh)
#   bash benchmarks/serve_device.sh PHASE OUT_DIR     # 8b | policies | tfserve | 70b-run | 70b-start | 70b-load | 70b-stop
#                                                     # | metrics-8b | metrics-70b | eval-8b
# Run from a `git archive` of the commit under test; every phase appends to OUT_DIR/steps.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:/tmp/hpi-path PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
M="python3 benchmarks/serve_matrix.py"
phase=$1
O=${2:-/tmp/o}
V=128000  # prompt words are drawn below the Llama-3 vocabulary (128256)
case $phase in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site ../.whl/*.whl &&
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site ../.whl/deepspeed-*.tar.gz &&
  mkdir -p /tmp/hpi-path && ln -sfn "$PWD/src" /tmp/hpi-path/hpi && python3 -c "import hpi.cli, deepspeed, fastapi, uvicorn, httpx2, openai, lm_eval, datasets; print('setup ok')" ;;
8b)  # resident, CUDA-graphed: hpi run at bs 1 / 64 beside hpi serve under 1..64 clients and a mixed set
  $M run --name 8b-run-b1 --out "$O" -- --model llama-3-8b --batch 1 --prompt-len 512 --gen-len 128
  $M run --name 8b-run-b64 --out "$O" -- --model llama-3-8b --batch 64 --prompt-len 512 --gen-len 128
  $M start --name 8b --out "$O" --port 8100 -- --model llama-3-8b --max-batch 64 --max-model-len 1280
  $M load --name 8b --out "$O" --port 8100 --model llama-3-8b -- --clients 1,4,16,64 --vocab $V
  $M load --name 8b-mixed --out "$O" --port 8100 --model llama-3-8b -- --clients 16 --requests 2 --mixed --vocab $V
  $M stop --name 8b --out "$O" ;;
policies)  # weight-streamed 8B (ZeRO-3 CPU offload): fused vs separate steps, staggered mixed requests
  for policy in fused separate; do
    $M start --name 8b-off-$policy --out "$O" --port 8101 -- --model llama-3-8b --offload cpu --max-batch 16 \
      --max-model-len 1280 --policy $policy
    $M load --name 8b-off-$policy --out "$O" --port 8101 --model llama-3-8b -- --clients 16 --requests 2 --mixed --mixed-gen-max 64 --vocab $V --seed 1
    $M stop --name 8b-off-$policy --out "$O"
  done ;;
tfserve)
  $M tfserve --name tf-8b --out "$O" --port 8200 --model llama-3-8b --work /tmp/ckpt-8b -- --clients 1,4,16,64 --vocab $V ;;
70b-run)  # the offline decode step of the plan served below
  $M run --name 70b-q4-run-b1 --out "$O" -- --model llama-3-70b --offload cpu --quant-bits 4 --batch 1 --prompt-len 512 --gen-len 8 ;;
70b-start)
  $M start --name 70b-q4 --out "$O" --port 8102 -- --model llama-3-70b --offload cpu --quant-bits 4 --max-batch 16 --max-model-len 640 ;;
70b-load)  # clients given as the third argument, e.g. 1,16
  $M load --name "70b-q4-c${3//,/-}" --out "$O" --port 8102 --model llama-3-70b -- --clients "$3" --vocab $V ;;
70b-stop)
  $M stop --name 70b-q4 --out "$O" ;;
metrics-8b)  # /metrics of a resident 8B under load, with the planner's prediction beside the measured step
  $M start --name m8b --out "$O" --port 8100 -- --model llama-3-8b --hardware h200-2gpu --max-batch 16 --max-model-len 1280
  $M load --name m8b --out "$O" --port 8100 --model llama-3-8b -- --clients 1,16 --gen-len 64 --vocab $V
  $M scrape --name m8b --out "$O" --port 8100
  $M stop --name m8b --out "$O" ;;
metrics-70b)  # /metrics of the 4-bit 70B streamed from pinned CPU memory: the host->device series live
  $M start --name m70b --out "$O" --port 8102 -- --model llama-3-70b --hardware h200-2gpu --offload cpu --quant-bits 4 --max-batch 4 --max-model-len 640
  $M load --name m70b --out "$O" --port 8102 --model llama-3-70b -- --clients 1 --gen-len 24 --vocab $V
  $M scrape --name m70b --out "$O" --port 8102
  $M stop --name m70b --out "$O" ;;
eval-8b)  # hpi eval (lm-eval through the serving runtime) of an 8B shape, resident and ZeRO-3 CPU offload, bf16 parity
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 benchmarks/eval_device.py --out "$O" ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
