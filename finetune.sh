#!/usr/bin/env bash
# Fine-tune with finetune.py's defaults; extra arguments pass through:
#   ./finetune.sh --epochs 3 --lr 2e-5
#   MODEL=Qwen/Qwen2-VL-7B-Instruct ./finetune.sh --gradient-checkpointing
# MODEL=tiny builds a tiny random Qwen2-VL and runs the whole loop offline, on the CPU too:
#   MODEL=tiny ./finetune.sh
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python}"
train="${TRAIN:-$python finetune.py}"  # finetune_distributed.sh sets a torchrun command here

if [[ "${MODEL:-}" == "tiny" ]]; then
    tiny_dir="$(mktemp -d)"
    trap 'rm -rf "$tiny_dir"' EXIT
    "$python" -m qwen_ft.tiny "$tiny_dir"
    $train --model "$tiny_dir" --output-dir output-tiny "$@"
    exit
fi
exec $train ${MODEL:+--model "$MODEL"} "$@"
