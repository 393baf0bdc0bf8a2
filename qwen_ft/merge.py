"""Merge a LoRA adapter into its base model, for a standalone checkpoint that needs no peft.

    python -m qwen_ft.merge --base Qwen/Qwen2-VL-2B-Instruct --adapter output --out merged

The base loads in the dtype of its config.json (or the one --dtype names), never in 4 bits, so a
QLoRA adapter merges into full-precision weights too, and a merged fp32 model gives the logits of
base plus adapter to fp32 rounding. Modules trained in full beside the adapter (such as the merger)
replace the base's. The processor saved with the adapter (else the base's) is saved beside.

--out is locked as a training run's output folder is (a run or a merge writing there stops this one),
and the model is written beside and moved in, as finetune.py's is: a merge that fails (a full disk)
leaves nothing that looks like a model.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from qwen_ft.disk import WRITE_ERRORS, SaveFailed, failed_write, publish
from qwen_ft.lock import FolderInUse, take
from qwen_ft.lora import load_with_adapter
from qwen_ft.model import ModelUnavailable, has_processor, load_processor


def merge(base: str, adapter: str, out: str, precision: str = "auto") -> None:
    folder = Path(out)
    lock = take(folder, what="merge", instead="pass another --out")
    try:
        model = load_with_adapter(base, adapter, precision, torch.device("cpu")).merge_and_unload()
        partial = folder / ".tmp-model"
        shutil.rmtree(partial, ignore_errors=True)  # a crash's
        try:
            model.save_pretrained(partial)
            load_processor(adapter if has_processor(adapter) else base).save_pretrained(partial)
            publish(partial, folder)
        except WRITE_ERRORS as e:
            shutil.rmtree(partial, ignore_errors=True)
            needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            raise SaveFailed(failed_write("the merged model", folder, e, needed)) from None
    finally:
        lock.release()


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
    except (ModelUnavailable, FolderInUse, SaveFailed) as e:
        sys.exit(f"error: {e}")
    print(f"saved the merged model to {args.out}")


if __name__ == "__main__":
    main()
