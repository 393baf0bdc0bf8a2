"""The training data as a run starts on it: read, checked (structure, media, length) and measured.

Every sample is checked before the model loads, so that bad input stops the run in seconds rather than
after minutes of loading weights; its token counts then plan the micro-batches (and the memory plan).
"""

from qwen_ft.collate import Collator
from qwen_ft.config import Config
from qwen_ft.data import DataError, describe, mix, read_samples
from qwen_ft.data_index import index_folder, index_settings, load_index, save_index
from qwen_ft.dist import Dist
from qwen_ft.lengths import fit, measure
from qwen_ft.media_check import check_media
from qwen_ft.samples import Samples


def checked_samples(spec: str, cfg: Config, collator: Collator, dist: Dist) -> Samples:
    """The samples of --data (or --eval-data), checked (structure, media, length) and mixed by their sources'
    weights; the first problems stop the run. What the data index holds for a source is not checked again."""
    samples = read_samples(spec, special_tokens=collator.tokens.all_strings, **cfg.reading())
    for line in describe(samples):
        dist.print(line)
    index, settings, full = index_folder(cfg.output_dir), index_settings(cfg, collator), cfg.check_media == "full"
    unknown = sorted(set().union(*dist.all_gather_objects(load_index(index, samples, settings, full))))
    # Each process checks and measures a share of what the index doesn't hold, and they exchange what they found.
    check_media(
        samples.of_sources(unknown), cfg.video(), collator.video_factor, full, dist=dist, max_pixels=cfg.max_pixels
    )
    measure(collator, samples.of_sources(unknown), dist)
    if dist.is_main and unknown:
        save_index(index, samples, settings, unknown, full)
    samples = fit(samples, cfg.max_length, quiet=not dist.is_main)
    if not samples:
        raise DataError(f"{spec}: no sample fits in --max-length {cfg.max_length}")
    return mix(samples, cfg.seed)
