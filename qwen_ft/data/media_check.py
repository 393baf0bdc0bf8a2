"""Checking every image and video the samples name, before training, and recording the sizes they will have.

An image is checked from its header by default (its size and EXIF orientation): enough to count its
tokens, and to catch a file that is missing, unreadable or not an image, at about 0.1 ms an image.
`--check-media full` decodes every image as well (about 12 ms for a 1280x960 JPEG), which also
catches a truncated or corrupt one; by default such an image is found when training loads it, and
stops the run or, with --skip-bad-samples, is skipped. Each distinct file is checked once, however
many samples use it. A video's metadata and every packet are read in both modes (a truncated file
fails), and its frames are planned: which ones, at what size.
"""

import concurrent.futures
import json

import numpy as np

from qwen_ft.data import fetch
from qwen_ft.data.media import MediaError, hide_pil_size_warning, image_header, load_image
from qwen_ft.data.read import raise_if_any
from qwen_ft.data.samples import Samples
from qwen_ft.grounding import problems as box_problems
from qwen_ft.video import VideoSettings, plan_video

CHECKS = ("header", "full")


def image_size(ref: str, full: bool, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of the image as the model will get it, before resizing; MediaError if it can't be read,
    or is too large to be decoded for max_pixels (media.pixel_cap)."""
    return load_image(ref, max_pixels).size[::-1] if full else image_header(ref, max_pixels)


def in_threads(function, items: list, threads: int) -> list:
    """[function(item) for item in items], run by a pool of threads. On Ctrl-C (or an error) the items not yet
    started are dropped and the URL fetches under way are ended, so that the check stops at once: the pool's
    threads are not waited for, here or when the interpreter exits, beyond the file each is reading."""
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    futures = [pool.submit(function, item) for item in items]
    try:
        results = []
        for future in futures:
            while True:
                try:  # waiting a second at a time, so that a signal another thread took is seen here within one
                    results.append(future.result(timeout=1))
                    break
                except concurrent.futures.TimeoutError:
                    continue
        return results
    except BaseException:
        fetch.abort()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def check_media(
    samples: Samples, video: VideoSettings | None = None, factor: int = 28, full: bool = False, threads: int = 8,
    dist=None, max_pixels: int | None = None,
):  # fmt: skip
    """Check the images and videos of these samples and record what the model will get of them (into the
    Samples' table); DataError names each sample whose media can't be read as asked.

    video holds the defaults for a sample's video parts; factor is the model's patch size times its
    spatial merge size (the multiple frame sides are resized to); max_pixels is --max-pixels, which sets
    how large an image may be to be decoded (media.pixel_cap). In a distributed run (dist) each process
    checks a share of the files, and all of them learn every size and every problem.
    """
    video = video or VideoSettings()
    hide_pil_size_warning()
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    table = samples.table

    # Images: each distinct file once, wherever it is used.
    rows, owners = samples.image_rows()
    ids = np.unique(table["image_ids"][rows])

    def check_image(i: int):
        try:
            return image_size(samples.image_refs[i], full, max_pixels), None
        except MediaError as e:
            return None, f"image {e}"

    mine = in_threads(check_image, ids[rank::world_size].tolist(), threads)
    shares = dist.all_gather_objects(mine) if dist else [mine]
    sizes, problems = np.zeros((len(samples.image_refs), 2), np.int32), {}
    for k, i in enumerate(ids.tolist()):
        size, problem = shares[k % world_size][k // world_size]
        if problem:
            problems[i] = problem
        else:
            sizes[i] = size
    table["image_sizes"][rows] = sizes[table["image_ids"][rows]]
    errors = {}  # sample position -> its first problem, in the samples' order
    if problems:
        for position, i in zip(owners.tolist(), table["image_ids"][rows].tolist()):
            if i in problems:
                errors.setdefault(position, problems[i])

    # Videos: each sample's plan of frames, from each distinct (file, settings) once.
    in_view = set(samples.order.tolist())
    with_video = [p for p in samples.with_video if p in in_view]
    planned = {}

    def plan(position: int):
        try:
            plans = []
            for part in samples.sample(position).parts("video"):
                settings = video.for_part(part)
                key = (json.dumps(part["video"]), settings)
                if key not in planned:
                    planned[key] = plan_video(part["video"], settings, factor)
                plans.append(planned[key])
            return plans, None
        except MediaError as e:
            return [], f"video {e}"
        except (TypeError, ValueError) as e:  # a per-sample setting of the wrong type or range
            return [], f"video settings: {e}"

    mine = in_threads(plan, with_video[rank::world_size], threads)
    shares = dist.all_gather_objects(mine) if dist else [mine]
    for k, position in enumerate(with_video):
        plans, problem = shares[k % world_size][k // world_size]
        samples.video_plans[position] = plans
        if problem and position not in errors:
            errors[position] = problem
    for position, problem in box_problems(samples).items():  # boxes and points need their images' sizes
        errors.setdefault(position, problem)
    if errors:
        order = {position: k for k, position in enumerate(samples.order.tolist())}
        raise_if_any([f"{samples.where(p)}: {errors[p]}" for p in sorted(errors, key=order.__getitem__)])
