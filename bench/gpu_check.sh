#!/usr/bin/env bash
# The GPU check (one command, one table, inside 8 minutes on one GPU). On a machine with only
# torch/transformers/tiktoken/safetensors, the rest comes as wheels in .whl/ (made here by
# `bash bench/gpu_wheels.sh`, about 10 MB: megatron-core, DeepSpeed and its pydantic, the
# dashscope wheel for the Qwen vocabulary), installed into /tmp/site, never onto the system.
#   bash bench/gpu_check.sh [--cpu] [--out DIR] [--only pretrain,sft,...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -d .whl ]] && ! "$PY" -c "import megatron.core, deepspeed" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
exec "$PY" bench/gpu_check.py "$@"
