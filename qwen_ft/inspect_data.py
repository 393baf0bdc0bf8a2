"""Show how each sample is tokenized for training: the text with trained spans marked, and token counts.

It takes the finetune.py flags that shape the data (--model, --data and its format, --max-length,
pixels, video settings), which apply as in training. It names each data file's format first.

    python -m qwen_ft.inspect_data --model Qwen/Qwen2-VL-2B-Instruct --data train_data/data.json --limit 5
    python -m qwen_ft.inspect_data --model M --data F --json    # one JSON object per sample per line
    python -m qwen_ft.inspect_data --model M --data train_data/pairs.json --pairs   # finetune_dpo.py's pairs

Trained spans (labels != -100) are shown between [[ and ]]; a run of image placeholders is
shown once with its length. The samples go through the same checks and collator as training. The
totals over the samples shown come last (on stderr with --json). With --pairs, each preference
pair is shown as its two rows, chosen and rejected, with only the answer of each trained.
"""

import itertools
import json
import sys

import numpy as np

from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import Config, build_parser
from qwen_ft.data.lengths import fit, measure
from qwen_ft.data.media import MediaError
from qwen_ft.data.media_check import check_media
from qwen_ft.data.pairs import PairCollator, read_pairs
from qwen_ft.data.read import DataError, describe, read_samples
from qwen_ft.model import ModelUnavailable, load_processor


def render(ids: list[int], labels: list[int], tokenizer, placeholder_ids: set[int]) -> str:
    """The decoded sequence, trained spans in [[ ]], placeholder runs as <|image_pad|>*N."""
    pieces = []
    for (trained, placeholder), group in itertools.groupby(
        zip(ids, labels), key=lambda pair: (pair[1] != IGNORE_INDEX, pair[0] in placeholder_ids)
    ):
        run = [token for token, _ in group]
        text = tokenizer.decode(run[:1]) + f"*{len(run)}" if placeholder else tokenizer.decode(run)
        pieces.append(f"[[{text}]]" if trained else text)
    return "".join(pieces)


# The finetune.py flags that change how a sample is tokenized; the others have no effect here.
DATA_FLAGS = (
    "model", "data", "data_format", "columns", "check_media", "media_root", "min_pixels", "max_pixels",
    "video_fps", "video_max_frames", "video_max_pixels", "video_total_pixels", "max_length", "trust_remote_code",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.splitlines()[0], only=DATA_FLAGS)
    parser.add_argument("--limit", type=int, help="check, tokenize and show only the first N samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample and nothing else")
    parser.add_argument("--pairs", action="store_true", help="the data holds preference pairs (finetune_dpo.py's)")
    args = vars(parser.parse_args(argv))
    as_json, limit, pairs = args.pop("json"), args.pop("limit"), args.pop("pairs")
    cfg = Config(**args)

    try:
        processor = load_processor(
            cfg.model, cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels, cfg.trust_remote_code
        )
        collator = Collator(processor, cfg.max_length, cfg.video())
        if pairs:  # two samples a pair, its chosen and its rejected conversation
            samples = read_pairs(cfg.data, cfg, collator.tokens.all_strings)
            described = describe(samples.select(range(0, len(samples), 2)), unit="pairs")
        else:
            samples = read_samples(cfg.data, special_tokens=collator.tokens.all_strings, **cfg.reading())
            described = describe(samples)
        for line in described:
            print(line, file=sys.stderr if as_json else sys.stdout)
        samples = samples[: limit * (1 + pairs) if limit is not None else None]
        check_media(
            samples, cfg.video(), collator.video_factor, full=cfg.check_media == "full", max_pixels=cfg.max_pixels
        )
        measure(collator, samples)
        kept = fit(samples, cfg.max_length)
        if pairs:  # as in training, a pair with a side longer than --max-length is left out whole
            fits = samples.table["measure"][samples.order, 0] <= cfg.max_length
            whole = np.flatnonzero(fits[0::2] & fits[1::2])
            kept = samples.select(np.stack([2 * whole, 2 * whole + 1], axis=1).flatten())
    except (DataError, MediaError, ModelUnavailable) as e:
        sys.exit(f"error: {e}")

    if pairs:  # each side as PairCollator makes it: only the answer trained
        make_batch = PairCollator(collator)
        rows = [
            (sample, make_batch([(0, chosen, rejected)]), side)
            for chosen, rejected in zip(kept[0::2], kept[1::2])
            for side, sample in enumerate((chosen, rejected))
        ]
    else:
        rows = [(sample, collator([sample]), 0) for sample in kept]
    placeholders = {collator.tokens.image_pad, collator.tokens.video_pad}
    totals = dict.fromkeys(("tokens", "text_tokens", "image_tokens", "video_tokens", "trained_tokens"), 0)
    for sample, batch, row in rows:
        real = batch["attention_mask"][row].bool()  # a pair's shorter side is padded
        ids, labels = batch["input_ids"][row][real].tolist(), batch["labels"][row][real].tolist()
        image_tokens = ids.count(collator.tokens.image_pad)
        video_tokens = ids.count(collator.tokens.video_pad)
        counts = {
            "tokens": len(ids),
            "text_tokens": len(ids) - image_tokens - video_tokens,
            "image_tokens": image_tokens,
            "video_tokens": video_tokens,
            "trained_tokens": sum(label != IGNORE_INDEX for label in labels),
        }
        totals = {name: totals[name] + counts[name] for name in totals}
        side = {"side": ("chosen", "rejected")[row]} if pairs else {}
        if as_json:
            print(
                json.dumps(
                    {
                        "index": sample.index,
                        "source": sample.source,
                        **side,
                        **counts,
                        "input_ids": ids,
                        "labels": labels,
                    }
                )
            )
        else:
            print(f"== {sample.where}" + (f", {side['side']}" if pairs else ""))
            print(render(ids, labels, processor.tokenizer, placeholders))
            print(", ".join(f"{value} {name.replace('_', ' ')}" for name, value in counts.items()) + "\n")
    skipped = f" ({len(samples) - len(kept)} too long for --max-length, skipped)" if len(kept) < len(samples) else ""
    summary = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in totals.items())
    shown = f"{len(kept) // 2} pairs" if pairs else f"{len(kept)} samples"
    print(f"{shown}{skipped}: {summary}", file=sys.stderr if as_json else sys.stdout)


if __name__ == "__main__":
    main()
