#!/usr/bin/env bash
# Fine-tune with finetune.py's defaults; extra arguments pass through:
#   ./finetune.sh --epochs 3 --lr 2e-5
#   MODEL=Qwen/Qwen2-VL-7B-Instruct ./finetune.sh --gradient-checkpointing
# MODEL=tiny runs the whole loop offline, on the CPU too, on a tiny random model of FAMILY (qwen2-vl,
# qwen2.5-vl, qwen3-vl, qwen3-vl-moe or qwen3.5; default qwen2-vl) built once in ~/.cache/qwen-ft
# (TINY_DIR to put it elsewhere) and reused, so that a tiny run can be resumed:
#   MODEL=tiny ./finetune.sh --max-steps 4 --save-every 2 && MODEL=tiny ./finetune.sh --max-steps 8 --resume
#   MODEL=tiny FAMILY=qwen3-vl ./finetune.sh --max-steps 4
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python}"
train="${TRAIN:-$python finetune.py}"  # finetune_distributed.sh sets a torchrun command here

if [[ "${MODEL:-}" == "tiny" ]]; then
    family="${FAMILY:-qwen2-vl}"
    tiny_dir="${TINY_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen-ft/tiny-$family}"
    "$python" -m qwen_ft.tiny "$tiny_dir" --family "$family" --reuse >/dev/null
    exec $train --model "$tiny_dir" --output-dir output-tiny "$@"
fi
exec $train ${MODEL:+--model "$MODEL"} "$@"
