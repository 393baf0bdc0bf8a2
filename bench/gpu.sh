#!/usr/bin/env bash
# Every GPU figure of the project in one job of under 25 minutes, for a lent GPU machine.
#
#   bash bench/gpu.sh wheels   # here, with network: the packages the GPU machine lacks, as wheels in .whl/
#   bash bench/gpu.sh          # there, the same command on every call (carry .whl/1, then .whl/2, then none)
#
# The GPU machine has its own PyTorch but not this project's other dependencies, no network, 64 MiB a
# call and 10 minutes a command. So the wheels travel in two folders, one per call, and install into
# /tmp/site, which the machine keeps while it stays warm; once everything imports, the job starts in a
# session of its own (so it outlives the call) and each call waits up to WAIT_S seconds for it, copying
# its log and the rows for docs/BENCHMARKS.md to $OUT. Call again until it says "done".
#
#   SIZES=tiny bash bench/gpu.sh job     # the same commands on the tiny model: a check of this script on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
work="${WORK:-/tmp/qwen-ft-gpu}"
runs="$work/runs"
out="${OUT:-$work/out}"
mkdir -p "$work" "$out"

# One benchmark command: its output goes to the log, its BENCHMARKS.md rows (lines starting "| " but the
# header and separator, and the "Command:" line) to rows.md.
bench() {
    timeout "${BENCH_TIMEOUT_S:-900}" "$python" "$@" | tee "$work/last.txt"
    grep -E '^\| |^Command|x \(medians' "$work/last.txt" | grep -v -e '^| device' -e '^| ---' >>"$work/rows.md"
    echo >>"$work/rows.md"
    # The runs' saved models (a 2B full fine-tune is 9 GB in fp32) would fill the disk; the base models,
    # two levels up, are kept for the next command.
    find "$runs" -mindepth 3 -name '*.safetensors' -delete
}

job() {
    set -x
    nvidia-smi || true
    "$python" -c 'import torch, transformers, peft, bitsandbytes; print(torch.__version__, torch.version.cuda,
        transformers.__version__, peft.__version__, bitsandbytes.__version__)'
    "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    if [[ ${SIZES:-} == tiny ]]; then  # the same commands, small: a check of this script on the CPU
        small=(--size tiny --tokens 256 --image-tokens 64 --steps 4 --warmup 1)
        bench bench/train_throughput.py "${small[@]}" --mode lora --work-dir "$runs"
        bench bench/train_throughput.py "${small[@]}" --mode full --launch fsdp --work-dir "$runs"
        bench bench/train_throughput.py "${small[@]}" --mode lora --family qwen3-vl --work-dir "$runs"
        bench bench/packing.py --size tiny --samples 24 --repeats 1 --work-dir "$runs"
        bench bench/compare_trl.py --size tiny --steps 3 --repeats 1 --work-dir "$runs"
        bench bench/compare_trl.py --size tiny --data mixed --recipe best --modes lora --samples 12 --repeats 1 \
            --work-dir "$runs"
        bench bench/train_throughput.py "${small[@]}" --mode full --work-dir "$runs" -- --optim adamw8bit
        bench bench/compare_trl_dpo.py --size tiny --steps 3 --repeats 1 --image-side 112 --work-dir "$runs"
        bench bench/grpo_step.py --size tiny --max-new-tokens 16 --steps 3 --warmup 1 --work-dir "$runs"
    else
        # The published shapes at 2048 tokens, 1024 of them one image's (the QLoRA 7B goal: under 10 GB).
        for mode in full lora; do
            bench bench/train_throughput.py --size 2b --mode "$mode" --work-dir "$runs"
        done
        bench bench/train_throughput.py --size 7b --mode qlora --work-dir "$runs" -- --gradient-checkpointing
        # The DDP and FSDP2 wiring, in one process.
        for launch in ddp fsdp; do
            bench bench/train_throughput.py --size 2b --mode full --launch "$launch" --work-dir "$runs"
        done
        bench bench/packing.py --size 2b --llm-layers 0 --samples 48 --repeats 1 --work-dir "$runs"
        # One bf16 LoRA run of each family at its smallest published shape (Qwen2-VL's 2B ran above).
        bench bench/train_throughput.py --family qwen2.5-vl --size 3b --mode lora --work-dir "$runs"
        bench bench/train_throughput.py --family qwen3-vl --size 2b --mode lora --work-dir "$runs"
        # Against TRL's SFTTrainer on the whole 2B shape, LoRA and full; and each side's best recipe on the
        # real-shaped mix at finetune.py's default image size.
        bench bench/compare_trl.py --size 2b --llm-layers 0 --steps 12 --warmup 2 --repeats 1 --work-dir "$runs"
        bench bench/compare_trl.py --size 2b --llm-layers 0 --data mixed --recipe best --modes lora --samples 64 \
            --image-max-pixels 1003520 --repeats 1 --work-dir "$runs"
        # Memory: 8-bit and paged 8-bit optimizer states (the rows carry the memory plan's prediction beside
        # max_memory_allocated), and the plan against the profiler's peak on compare_trl.py's model.
        for optim in adamw8bit paged-adamw8bit; do
            bench bench/train_throughput.py --size 2b --mode full --work-dir "$runs" -- --optim "$optim"
        done
        bench bench/memory_plan.py --work-dir "$runs"
        # finetune_dpo.py against TRL's DPOTrainer on the whole 2B shape, LoRA and full (bf16-mixed).
        bench bench/compare_trl_dpo.py --size 2b --llm-layers 0 --modes lora,full --steps 12 --warmup 2 \
            --batch-size 2 --work-dir "$runs"
        # GRPO: a step's sampling (2 prompts x 8 answers of 128 tokens, KV cache) against its policy update.
        for mode in lora full; do
            bench bench/grpo_step.py --size 2b --mode "$mode" --work-dir "$runs"
        done
    fi
    set +x
    echo "done"
}

case "${1:-}" in
    wheels)
        # Two folders of under 64 MiB each; --no-deps: the GPU machine has the rest (torch, tokenizers, ...).
        get() { "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$@"; }
        get .whl/1 bitsandbytes==0.50.2 peft==0.21.2 qwen-vl-utils==0.0.14 trl==1.16.0 datasets==5.2.0 \
            dill==0.4.1 multiprocess==0.70.19
        get .whl/2 transformers==5.24.0 av==19.0.2
        du -sh .whl/*
        ;;
    job)
        job
        ;;
    "")
        for wheel in .whl/*/*.whl; do
            [[ -e $wheel ]] && "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheel"
        done
        export PYTHONPATH="/tmp/site:$PWD"
        if ! "$python" -c 'import transformers, peft, bitsandbytes, av, qwen_vl_utils, trl' 2>/dev/null; then
            echo "not everything imports yet: call again carrying the next .whl folder"
            exit 0
        fi
        if [[ ! -e $work/started ]]; then
            touch "$work/started"
            setsid nohup bash "$0" job >"$work/job.log" 2>&1 </dev/null &
        fi
        waited=0
        until grep -qx done "$work/job.log" 2>/dev/null || ((waited >= ${WAIT_S:-540})); do
            sleep 10
            waited=$((waited + 10))
        done
        cp "$work/job.log" "$out/job.log"
        [[ -e $work/rows.md ]] && cp "$work/rows.md" "$out/rows.md"
        tail -n 30 "$work/job.log"
        ;;
    *)
        echo "usage: bash bench/gpu.sh [wheels|job]" >&2
        exit 2
        ;;
esac
