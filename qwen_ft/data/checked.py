"""The training data as a run starts on it: read, checked (structure, media, length) and measured.

Every sample is checked before the model loads, so that bad input stops the run in seconds rather than
after minutes of loading weights; its token counts then plan the micro-batches (and the memory plan).
"""

from qwen_ft.collate import Collator
from qwen_ft.config import Config
from qwen_ft.data.index import index_folder, index_settings, load_index, save_index
from qwen_ft.data.lengths import fit, measure
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import DataError, describe, mix, read_samples
from qwen_ft.data.samples import Samples
from qwen_ft.dist import Dist


def checked_samples(spec: str, cfg: Config, collator: Collator, dist: Dist) -> Samples:
    """The samples of --data (or --eval-data), checked (structure, media, length) and mixed by their sources'
    weights; the first problems stop the run. What the data index holds for a source is not checked again."""
    samples = read_samples(spec, special_tokens=collator.tokens.all_strings, **cfg.reading())
    for line in describe(samples):
        dist.print(line)
    check_and_measure(samples, cfg, collator, dist)
    samples = fit(samples, cfg.max_length, quiet=not dist.is_main)
    if not samples:
        raise DataError(f"{spec}: no sample fits in --max-length {cfg.max_length}")
    return mix(samples, cfg.seed)


def check_and_measure(samples: Samples, cfg: Config, collator: Collator, dist: Dist, kind: str = "samples") -> None:
    """Record the sizes of the samples' media and their token counts (into the Samples' table); DataError names
    each sample whose media can't be read. For each source the data index holds nothing valid for, each process
    checks the media of a share of its samples and counts their tokens, they exchange what they found, and the
    first process adds it to the index, so that the next start on the same data skips this part. kind
    ("samples", or "pairs": two samples a record) is part of the index's key, so that a file read both ways
    keeps an entry for each."""
    index, settings, full = index_folder(cfg.output_dir), index_settings(cfg, collator), cfg.check_media == "full"
    if kind != "samples":
        settings["kind"] = kind
    unknown = sorted(set().union(*dist.all_gather_objects(load_index(index, samples, settings, full))))
    check_media(
        samples.of_sources(unknown), cfg.video(), collator.video_factor, full, dist=dist, max_pixels=cfg.max_pixels
    )
    measure(collator, samples.of_sources(unknown), dist)
    if dist.is_main and unknown:
        save_index(index, samples, settings, unknown, full)
