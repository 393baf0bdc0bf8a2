#!/usr/bin/env bash
# Fine-tune on every visible GPU (or NPROC processes) with torchrun; finetune.py's flags pass through:
#   ./finetune_distributed.sh --lora
#   NPROC=2 MODEL=tiny ./finetune_distributed.sh        # two CPU processes on the tiny model, offline
# For several nodes, run torchrun yourself (see the README).
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python}"
nproc="${NPROC:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
TRAIN="$python -m torch.distributed.run --standalone --nproc-per-node $nproc finetune_distributed.py" \
    exec ./finetune.sh "$@"
