"""How many tokens each sample will be, known before training from its text and its media's sizes.

The collator makes the real input_ids only when a batch is built; the check against --max-length,
the micro-batch plan of --max-tokens and the data index need the counts before that. They come from
the model's own chat template and tokenizer, with each image's and video's placeholder expanded as
the processor will expand it, so they equal what the collator then produces.
"""

import sys

import numpy as np
import torch

from qwen_ft.collate import IGNORE_INDEX, Collator, assistant_labels
from qwen_ft.samples import Sample, Samples
from qwen_ft.video import VideoPlan, clip_metadata

CHUNK = 512  # samples tokenized in one call: the tokenizer works through a batch in parallel
NONE = np.iinfo(np.int32).max  # no image, or nothing trained


def image_tokens(collator: Collator, height: int, width: int) -> int:
    """Placeholder tokens the processor gives an image of this size (after Qwen's smart resize)."""
    image_processor = collator.processor.image_processor
    return image_processor.get_number_of_image_patches(height, width) // image_processor.merge_size**2


def video_token_ids(collator: Collator, plan: VideoPlan) -> list[int]:
    """What the processor puts in place of a video's <|video_pad|>, from its plan alone: a placeholder per
    temporal patch and merged 2D patch, and for Qwen3-VL each frame's time ("<0.2 seconds>") in text.
    The processor's own replacement is tokenized, so the count follows the processor, whatever it writes."""
    processor = collator.processor
    video_processor = processor.video_processor
    patch, temporal_patch = video_processor.patch_size, video_processor.temporal_patch_size
    grid = torch.tensor([[plan.frames // temporal_patch, plan.height // patch, plan.width // patch]])
    inputs = {"video_grid_thw": grid, "video_metadata": [clip_metadata(plan.times, plan.sample_fps)]}
    text = processor.replace_video_token(inputs, 0)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def token_ids(collator: Collator, sample: Sample) -> list[int]:
    """The input_ids the processor will produce for this sample, from its media's sizes alone."""
    tokens = collator.tokens
    images, plans = iter(sample.image_sizes), iter(sample.video_plans)
    expanded = []
    for token in collator.processor.tokenizer(collator.text(sample), add_special_tokens=False)["input_ids"]:
        if token == tokens.image_pad:
            expanded.extend([token] * image_tokens(collator, *next(images)))
        elif token == tokens.video_pad:
            expanded.extend(video_token_ids(collator, next(plans)))
        else:
            expanded.append(token)
    return expanded


def measure(collator: Collator, samples: Samples, dist=None) -> None:
    """Record each sample's token count, the end of its last image or video and its first trained token
    (into the Samples' table as "measure"; fit reads them for any --max-length). In a distributed run
    (dist) each process measures a share, and all of them learn every count.

    Counted on the template's tokens, before the placeholders are expanded (an image is often a thousand
    tokens): each expansion only shifts what follows it."""
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    mine = samples.select(np.arange(rank, len(samples), world_size))
    counted = np.zeros((len(mine), 3), np.int32)
    tokenizer, tokens = collator.processor.tokenizer, collator.tokens
    videos = {}  # a plan's tokens, computed once
    for start in range(0, len(mine), CHUNK):
        chunk = mine[start : start + CHUNK]
        loaded = list(chunk)
        texts = tokenizer([collator.text(sample) for sample in loaded], add_special_tokens=False)["input_ids"]
        for row, sample, ids in zip(range(start, start + len(chunk)), loaded, texts):
            images, plans = iter(sample.image_sizes), iter(sample.video_plans)
            labels = assistant_labels(ids, tokens)
            first_trained = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
            shift, vision_end, trained_at = 0, 0, NONE  # shift: tokens the expansions so far added
            for i, token in enumerate(ids):
                if i == first_trained:
                    trained_at = i + shift
                if token == tokens.image_pad:
                    shift += image_tokens(collator, *next(images)) - 1
                elif token == tokens.video_pad:
                    plan = next(plans)
                    if plan not in videos:
                        videos[plan] = video_token_ids(collator, plan)
                    expansion = videos[plan]
                    if tokens.vision_end in expansion:  # Qwen3-VL closes each frame's time and patches
                        vision_end = i + shift + len(expansion) - expansion[::-1].index(tokens.vision_end)
                    shift += len(expansion) - 1
                elif token == tokens.vision_end:
                    vision_end = i + shift + 1
            counted[row] = (len(ids) + shift, vision_end, trained_at)
    shares = dist.all_gather_objects(counted) if dist else [counted]
    for share, counts in enumerate(shares):
        samples.table["measure"][samples.order[share::world_size]] = counts


def fit(samples: Samples, max_length: int, quiet: bool = False) -> Samples:
    """The samples that fit in max_length, cutting only text after the last image (or video) and keeping
    at least one trained token; warns about the rest (unless quiet: in every process but the first of
    a distributed run). Records each kept sample's length as the model will get it."""
    tokens, vision_end, first_trained = samples.table["measure"][samples.order].T
    long = tokens > max_length
    dropped = long & ((vision_end > max_length) | (first_trained >= max_length))
    samples.table["length"][samples.order] = np.minimum(tokens, max_length)
    if dropped.any() and not quiet:
        first = samples.where(int(samples.order[np.argmax(dropped)]))
        print(
            f"warning: skipped {dropped.sum()} of {len(samples)} samples longer than --max-length "
            f"{max_length} whose images or answers would be cut (first: {first}); "
            "raise --max-length or lower --max-pixels to keep them",
            file=sys.stderr,
        )
    cut = int((long & ~dropped).sum())
    if cut and not quiet:
        print(
            f"warning: cut the text after the last image of {cut} samples to --max-length {max_length}",
            file=sys.stderr,
        )
    return samples.select(np.flatnonzero(~dropped))
