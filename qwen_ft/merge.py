"""Merge a LoRA adapter into its base model, for a standalone checkpoint that needs no peft.

    python -m qwen_ft.merge --base Qwen/Qwen2-VL-2B-Instruct --adapter output --out merged

The base loads in the dtype of its config.json (or the one --dtype names), never in 4 bits, so a
QLoRA adapter merges into full-precision weights too, and a merged fp32 model gives the logits of
base plus adapter to fp32 rounding. Modules trained in full beside the adapter (such as the merger)
replace the base's. The processor saved with the adapter (else the base's) is saved beside.
"""

import argparse
import sys

import torch

from qwen_ft.lora import load_with_adapter
from qwen_ft.model import ModelUnavailable, has_processor, load_processor


def merge(base: str, adapter: str, out: str, precision: str = "auto") -> None:
    model = load_with_adapter(base, adapter, precision, torch.device("cpu")).merge_and_unload()
    model.save_pretrained(out)
    load_processor(adapter if has_processor(adapter) else base).save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--base", required=True, help="the base model the adapter was trained on (hub name or directory)"
    )
    parser.add_argument("--adapter", required=True, help="the adapter directory (a finetune.py --lora output dir)")
    parser.add_argument("--out", required=True, help="where to save the merged model")
    parser.add_argument(
        "--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="merged weights' dtype (auto: the base's)"
    )
    args = parser.parse_args(argv)
    try:
        merge(args.base, args.adapter, args.out, args.dtype)
    except ModelUnavailable as e:
        sys.exit(f"error: {e}")
    print(f"saved the merged model to {args.out}")


if __name__ == "__main__":
    main()
