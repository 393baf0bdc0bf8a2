"""Before training: every sample's media checked and its tokens counted, helped by the data index.

The data is read first (data.read_samples, which checks each sample's structure); then, for each
source the data index holds nothing valid for, each process checks the media of a share of its
samples and counts their tokens, they exchange what they found, and the first process adds it to
the index, so that the next start on the same data skips this part.
"""

from qwen_ft.data_index import index_folder, index_settings, load_index, save_index
from qwen_ft.lengths import measure
from qwen_ft.media_check import check_media
from qwen_ft.samples import Samples


def check_and_measure(samples: Samples, cfg, collator, dist, kind: str = "samples") -> None:
    """Record the sizes of the samples' media and their token counts (into the Samples' table); DataError names
    each sample whose media can't be read. kind ("samples", or "pairs": two samples a record) is part of the
    index's key, so that a file read both ways keeps an entry for each."""
    index, settings, full = index_folder(cfg.output_dir), index_settings(cfg, collator), cfg.check_media == "full"
    if kind != "samples":
        settings["kind"] = kind
    unknown = sorted(set().union(*dist.all_gather_objects(load_index(index, samples, settings, full))))
    # Each process checks and measures a share of what the index doesn't hold, and they exchange what they found.
    check_media(samples.of_sources(unknown), cfg.video(), collator.video_factor, full, dist=dist)
    measure(collator, samples.of_sources(unknown), dist)
    if dist.is_main and unknown:
        save_index(index, samples, settings, unknown, full)
