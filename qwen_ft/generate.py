"""Answer with a Qwen vision-language model: one question, or the last question of every sample in a data file.

    python -m qwen_ft.generate --model output --image test_data/images/0000.png --prompt "What colour is the shape?"
    python -m qwen_ft.generate --model output --data test_data/data.json --out predictions.jsonl

Decoding is greedy and stops at <|im_end|>. With --data, each sample is cut after its last user
message, the answer is compared with the assistant message that followed it, and the exact-match
accuracy is printed.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from qwen_ft.collate import Collator
from qwen_ft.config import Config
from qwen_ft.data import DataError, parse_columns, read_samples
from qwen_ft.formats import FORMATS
from qwen_ft.lora import load_with_adapter
from qwen_ft.media import MediaError, resolve
from qwen_ft.media_check import check_media
from qwen_ft.model import ModelUnavailable, has_processor, load_model, load_processor
from qwen_ft.samples import Sample, Samples


def question_and_reference(sample: Sample) -> tuple[list[dict], str | None]:
    """The messages up to the last user message, and the assistant text that answered it (if any)."""
    last_user = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
    answer = sample.messages[last_user + 1] if last_user + 1 < len(sample.messages) else None
    reference = "".join(p["text"] for p in answer["content"] if p["type"] == "text") if answer else None
    return sample.messages[: last_user + 1], reference


class Answerer:
    def __init__(self, model_name: str, device: torch.device, adapter: str | None = None, **settings):
        """settings: min_pixels, max_pixels (None: the processor's own) and video (VideoSettings)."""
        # A finetune.py --lora output holds the processor it trained with; prefer it to the base's.
        processor_source = adapter if adapter and has_processor(adapter) else model_name
        processor = load_processor(processor_source, settings.get("min_pixels"), settings.get("max_pixels"))
        self.collator = Collator(processor, max_length=sys.maxsize, video=settings.get("video"))
        precision = "bf16" if device.type == "cuda" else "fp32"
        if adapter:
            self.model = load_with_adapter(model_name, adapter, precision, device).eval()
        else:
            self.model = load_model(model_name, precision, "sdpa", device).eval()
        self.device = device

    def answer(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        return greedy_answers(self.model, self.collator, conversations, max_new_tokens)


@torch.no_grad()  # not inference_mode: FSDP would gather weights into inference tensors that training can't update
def greedy_answers(model, collator: Collator, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """The model's greedy answers to conversations that end with a user message, up to <|im_end|>."""
    # Left padding: every prompt then ends where generation starts.
    device = next(model.parameters()).device
    batch = collator.process(conversations, generation_prompt=True, padding_side="left").to(device)
    tokenizer = collator.processor.tokenizer
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=collator.tokens.im_end,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def score(prediction: str, reference: str) -> dict[str, float]:
    """How well one answer matches its reference. Exact match is built in; add your own metrics here (each key
    is averaged over the samples, printed by this tool and logged as eval_KEY by finetune.py --eval-generate)."""
    return {"exact_match": float(prediction == reference.strip())}


def answer_samples(model, collator: Collator, samples: Samples, batch_size: int, max_new_tokens: int):
    """{index, prediction, reference, and score()'s keys when there is a reference} for each sample, and the
    mean of each score over the samples with a reference."""
    results = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        questions, references = zip(*(question_and_reference(s) for s in chunk))
        predictions = greedy_answers(model, collator, list(questions), max_new_tokens)
        for sample, prediction, reference in zip(chunk, predictions, references):
            scores = score(prediction, reference) if reference is not None else {}
            results.append({"index": sample.index, "prediction": prediction, "reference": reference, **scores})
    scored = [r for r in results if r["reference"] is not None]
    keys = score("", "") if scored else {}
    means = {key: sum(r[key] for r in scored) / len(scored) for key in keys}
    return results, means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub name or local directory (e.g. a finetune.py output dir)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (finetune.py --lora output) to apply to --model")
    parser.add_argument("--image", action="append", default=[], help="image path or URL (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="video file or folder of frames (repeatable)")
    parser.add_argument(
        "--video-fps", type=float, default=Config.video_fps, help="frames per second taken from a video"
    )
    parser.add_argument("--prompt", help="the question to ask about the image(s)")
    parser.add_argument("--data", help="answer the last user message of every sample in this data file")
    parser.add_argument("--out", help="with --data: write {index, prediction, reference} JSON lines here")
    parser.add_argument("--data-format", choices=("auto", *FORMATS), default="auto", help="as finetune.py's")
    parser.add_argument("--columns", default="", help="as finetune.py's: KEY=COLUMN names of a dataset's columns")
    parser.add_argument("--media-root", default=".", help="folder relative media paths are also looked up in")
    parser.add_argument("--batch-size", type=int, default=16, help="samples generated together with --data")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer")
    parser.add_argument("--min-pixels", type=int, default=None, help="override the processor's smallest image size")
    parser.add_argument("--max-pixels", type=int, default=None, help="override the processor's largest image size")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.prompt is None):
        parser.error("give either --prompt (with --image) or --data")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        video = replace(Config().video(), fps=args.video_fps)
        pixels = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
        answerer = Answerer(args.model, device, args.adapter, video=video, **pixels)
        if args.prompt is not None:
            media = [(kind, ref) for kind in ("image", "video") for ref in getattr(args, kind)]
            parts = [{"type": kind, kind: resolve(ref, Path("."), Path(args.media_root))} for kind, ref in media]
            question = [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]
            print(answerer.answer([question], args.max_new_tokens)[0])
            return
        collator = answerer.collator
        data_format = None if args.data_format == "auto" else args.data_format
        samples = read_samples(
            args.data, args.media_root, collator.tokens.all_strings, require_answer=False,
            data_format=data_format, columns=parse_columns(args.columns),
        )  # fmt: skip
        check_media(samples, video, collator.video_factor)
    except (DataError, MediaError, ModelUnavailable) as e:
        sys.exit(f"error: {e}")

    results, means = answer_samples(answerer.model, collator, samples, args.batch_size, args.max_new_tokens)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    scored = sum(r["reference"] is not None for r in results)
    for key, mean in means.items():
        print(f"{key.replace('_', ' ')}: {round(mean * scored)}/{scored} = {mean:.1%}")


if __name__ == "__main__":
    main()
