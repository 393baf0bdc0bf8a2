"""How many tokens each sample will be, known before training from its text and its media's sizes.

The collator makes the real input_ids only when a batch is built; the check against --max-length,
the micro-batch plan of --max-tokens and the data index need the counts before that. They come from
the model's own chat template and tokenizer, with each image's and video's placeholder expanded as
the processor will expand it, so they equal what the collator then produces.
"""

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from qwen_ft.collate import IGNORE_INDEX, Collator, assistant_labels
from qwen_ft.data.samples import Sample, Samples
from qwen_ft.stop import die_with_parent, ignore_signals, signals_deferred
from qwen_ft.video import VideoPlan, clip_metadata

CHUNK = 512  # samples templated and tokenized in one call
MANY = 4 * CHUNK  # more samples than this are measured by worker processes
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
    text = collator.texts([collator.render(sample.messages, sample.image_sizes)])[0]
    expanded = []
    for token in collator.processor.tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token == tokens.image_pad:
            expanded.extend([token] * image_tokens(collator, *next(images)))
        elif token == tokens.video_pad:
            expanded.extend(video_token_ids(collator, next(plans)))
        else:
            expanded.append(token)
    return expanded


def measure(collator: Collator, samples: Samples, dist=None, processes: int | None = None) -> None:
    """Record each sample's token count, the end of its last image or video and its first trained token
    (into the Samples' table as "measure"; fit reads them for any --max-length). In a distributed run
    (dist) each process measures a share, and all of them learn every count.

    The chat template and the tokenizer take about 0.2 ms a sample on one core, so a large set is spread over
    `processes` forked workers: by default, for more than MANY samples, one per CPU core this process
    may use, shared with the other processes on its machine.
    """
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    mine = samples.select(np.arange(rank, len(samples), world_size))
    starts = range(0, len(mine), CHUNK)
    if processes is None:
        processes = cores_of_this_process() if len(mine) > MANY else 1
    if processes > 1 and len(starts) > 1 and "fork" in multiprocessing.get_all_start_methods():
        global forked_with
        forked_with = collator, mine  # what the workers inherit: nothing is pickled but the counts
        context, parent = multiprocessing.get_context("fork"), os.getpid()
        with signals_deferred():  # the workers start at the first submission
            pool = ProcessPoolExecutor(min(processes, len(starts)), context, start_worker, initargs=(parent,))
            chunks = [pool.submit(count_in_worker, start) for start in starts]
        try:
            counts = [chunk.result() for chunk in chunks]  # where Ctrl-C and SIGTERM stop the count
        finally:
            with signals_deferred():
                pool.shutdown(cancel_futures=True)  # after Ctrl-C, no chunk left queued
            forked_with = None
    else:
        counts = [count(collator, mine[start : start + CHUNK]) for start in starts]
    counted = np.concatenate(counts) if counts else np.zeros((0, 3), np.int32)
    shares = dist.all_gather_objects(counted) if dist else [counted]
    for share, share_counts in enumerate(shares):
        samples.table["measure"][samples.order[share::world_size]] = share_counts


def count(collator: Collator, chunk: Samples) -> np.ndarray:
    """measure's three numbers for each sample of the chunk, counted on the template's tokens, before the
    placeholders are expanded (an image is often a thousand tokens): each expansion only shifts what follows it."""
    tokens, loaded = collator.tokens, list(chunk)
    rendered = [collator.render(s.messages, s.image_sizes) for s in loaded]  # boxes written as the collator will
    texts = collator.processor.tokenizer(collator.texts(rendered), add_special_tokens=False)
    counted = np.zeros((len(loaded), 3), np.int32)
    videos = {}  # a plan's tokens, computed once
    for row, (sample, ids) in enumerate(zip(loaded, texts["input_ids"])):
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
    return counted


forked_with = None  # (collator, samples) of the measure whose workers are being forked


def count_in_worker(start: int) -> np.ndarray:
    collator, samples = forked_with
    return count(collator, samples[start : start + CHUNK])


def start_worker(parent: int) -> None:
    ignore_signals()  # Ctrl-C is the main process's to handle
    die_with_parent(parent)  # and as it ignores SIGTERM, nothing else would end it once its parent is gone
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the workers already use every core


def cores_of_this_process() -> int:
    """The CPU cores this process may use (its affinity, on Linux), shared evenly with the other
    processes torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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
