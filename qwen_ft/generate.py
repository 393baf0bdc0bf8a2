"""Answer with a Qwen vision-language model: one question, or the last question of every sample in a data file.

    python -m qwen_ft.generate --model output --image test_data/images/0000.png --prompt "What colour is the shape?"
    python -m qwen_ft.generate --model output --data test_data/data.json --out predictions.jsonl

Decoding is greedy (--temperature above 0 samples) and stops at <|im_end|>. With --data, each sample is
cut after its last user message, the answer is compared with the assistant message that followed it,
and the exact-match accuracy is printed; where that message holds boxes or points, the answer's are read
back and scored too (IoU: grounding.scores). The chat page, python -m qwen_ft.demo, answers with this code.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from qwen_ft import grounding
from qwen_ft.collate import Collator
from qwen_ft.config import Config
from qwen_ft.data.formats import FORMATS
from qwen_ft.data.media import MediaError, resolve
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import DataError, parse_columns, read_samples
from qwen_ft.data.samples import Sample, Samples
from qwen_ft.lora import load_with_adapter
from qwen_ft.model import ModelUnavailable, has_processor, load_model, load_processor


def question_and_reference(sample: Sample, collator: Collator | None = None) -> tuple[list[dict], str | None]:
    """The messages up to the last user message, and the assistant text that answered it (if any). With the
    collator, its boxes and points are written as the collator's model writes them, and read as a decoded
    answer reads (grounding.as_decoded: without Qwen2-VL's grounding tokens)."""
    last_user = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
    answer = answer_of(sample)
    if answer and collator:
        answer = collator.render([answer], sample.image_sizes)[0]
    reference = "".join(p["text"] for p in answer["content"] if p["type"] == "text") if answer else None
    return sample.messages[: last_user + 1], grounding.as_decoded(reference) if reference is not None else None


def answer_of(sample: Sample) -> dict | None:
    """The assistant message after the last user message, if any."""
    last_user = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
    return sample.messages[last_user + 1] if last_user + 1 < len(sample.messages) else None


def user_message(text: str, images: list[str] = (), videos: list[str] = ()) -> dict:
    """A user turn as the collator reads it: the images, the videos, then the question."""
    media = [{"type": "image", "image": image} for image in images] + [{"type": "video", "video": v} for v in videos]
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


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

    def answer(self, conversations: list[list[dict]], max_new_tokens: int, temperature=0.0, streamer=None):
        return generate_answers(self.model, self.collator, conversations, max_new_tokens, temperature, streamer)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model answers and how it sees media: this tool's and the chat page's."""
    parser.add_argument("--model", required=True, help="hub name or local directory (e.g. a finetune.py output dir)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (finetune.py --lora output) to apply to --model")
    parser.add_argument(
        "--video-fps", type=float, default=Config.video_fps, help="frames per second taken from a video"
    )
    parser.add_argument("--min-pixels", type=int, default=None, help="override the processor's smallest image size")
    parser.add_argument("--max-pixels", type=int, default=None, help="override the processor's largest image size")


def load_answerer(args: argparse.Namespace, model: str, adapter: str | None) -> Answerer:
    """model, with adapter if given, on the GPU if there is one, seeing media as add_model_options' flags say."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    video = replace(Config().video(), fps=args.video_fps)
    return Answerer(model, device, adapter, video=video, min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def decoding(temperature: float) -> dict:
    """generate()'s settings: greedy at temperature 0, else sampling from the whole distribution. The model's
    generation_config.json may set top_k and top_p (Qwen's make sampling all but greedy): they are set aside."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


@torch.no_grad()  # not inference_mode: FSDP would gather weights into inference tensors that training can't update
def generate_answers(
    model, collator: Collator, conversations: list[list[dict]], max_new_tokens: int, temperature=0.0, streamer=None
) -> list[str]:
    """The model's answers to conversations that end with a user message, up to <|im_end|>; greedy at temperature
    0. streamer (one conversation only): a transformers streamer, given the answer's tokens as they come."""
    # Left padding: every prompt then ends where generation starts.
    device = next(model.parameters()).device
    batch = collator.process(conversations, generation_prompt=True, padding_side="left").to(device)
    tokenizer = collator.processor.tokenizer
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=collator.tokens.im_end,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **decoding(temperature),
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def score(prediction: str, reference: str, boxes: grounding.Reference | None = None) -> dict[str, float]:
    """How well one answer matches its reference. Exact match is built in, and where the reference has boxes or
    points (boxes), the IoU of the answer's (grounding.scores: iou, iou50, point_in_box, point_distance). Add your
    own metrics here: each key is averaged over the samples that have it, printed by this tool and logged as
    eval_KEY by finetune.py --eval-generate."""
    located = grounding.scores(prediction, boxes) if boxes else {}
    return {"exact_match": float(prediction == reference.strip()), **located}


def answer_samples(model, collator: Collator, samples: Samples, batch_size: int, max_new_tokens: int):
    """{index, prediction, reference, and score()'s keys when there is a reference} for each sample, and the
    mean of each score over the samples that have it."""
    results = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        questions, references = zip(*(question_and_reference(s, collator) for s in chunk))
        predictions = generate_answers(model, collator, list(questions), max_new_tokens)
        for sample, prediction, reference in zip(chunk, predictions, references):
            boxes = grounding.reference(answer_of(sample), sample.image_sizes, collator.family, collator.resized)
            scores = score(prediction, reference, boxes) if reference is not None else {}
            results.append({"index": sample.index, "prediction": prediction, "reference": reference, **scores})
    keys = dict.fromkeys(key for r in results for key in r if key not in ("index", "prediction", "reference"))
    means = {key: sum(r[key] for r in results if key in r) / sum(key in r for r in results) for key in keys}
    return results, means


def summary(key: str, mean: float, count: int) -> str:
    """A printed line for one score: a count for shares of samples, a mean for the rest."""
    name = key.replace("_", " ")
    if key == "exact_match":
        return f"{name}: {round(mean * count)}/{count} = {mean:.1%}"
    if key == "point_distance":
        return f"{name}: {mean:.1f} px (mean over {count} samples)"
    if key == "iou":
        return f"{name}: {mean:.3f} (mean over {count} samples with boxes)"
    return f"{name}: {mean:.1%} (mean over {count} samples)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_options(parser)
    parser.add_argument("--image", action="append", default=[], help="image path or URL (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="video file or folder of frames (repeatable)")
    parser.add_argument("--prompt", help="the question to ask about the image(s)")
    parser.add_argument("--data", help="answer the last user message of every sample in this data file")
    parser.add_argument("--out", help="with --data: write {index, prediction, reference} JSON lines here")
    parser.add_argument("--data-format", choices=("auto", *FORMATS), default="auto", help="as finetune.py's")
    parser.add_argument("--columns", default="", help="as finetune.py's: KEY=COLUMN names of a dataset's columns")
    parser.add_argument("--media-root", default=".", help="folder relative media paths are also looked up in")
    parser.add_argument("--batch-size", type=int, default=16, help="samples generated together with --data")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample (with --prompt)")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.prompt is None):
        parser.error("give either --prompt (with --image) or --data")
    if args.data and args.temperature:
        parser.error("--data answers greedily, to score the answers: --temperature goes with --prompt")

    try:
        answerer = load_answerer(args, args.model, args.adapter)
        if args.prompt is not None:
            root = Path(args.media_root)
            images, videos = ([resolve(ref, Path("."), root) for ref in refs] for refs in (args.image, args.video))
            question = [user_message(args.prompt, images, videos)]
            print(answerer.answer([question], args.max_new_tokens, args.temperature)[0])
            return
        collator = answerer.collator
        data_format = None if args.data_format == "auto" else args.data_format
        samples = read_samples(
            args.data, args.media_root, collator.tokens.all_strings, require_answer=False,
            data_format=data_format, columns=parse_columns(args.columns),
        )  # fmt: skip
        check_media(samples, collator.video, collator.video_factor, max_pixels=collator.max_pixels)
    except (DataError, MediaError, ModelUnavailable) as e:
        sys.exit(f"error: {e}")

    results, means = answer_samples(answerer.model, collator, samples, args.batch_size, args.max_new_tokens)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    for key, mean in means.items():
        print(summary(key, mean, sum(key in r for r in results)))


if __name__ == "__main__":
    main()
