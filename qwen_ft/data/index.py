"""What the checks found about each data source, kept so that the next start on the same data skips them.

The index is a folder beside the output dir, `.qwen-ft-data-index`, with a small file per source:
the sizes of its images, the plans of its videos and its samples' token counts. A --resume, a second
run, or a run with another output dir in the same folder, on the same data, reads them instead of
opening every image and tokenizing every sample again. A file is used only when its key matches:
the source's path, size and modification time (of every file, for a dataset folder), and each
setting that changes what was found: the media root, --data-format, --columns, the pixel and video
settings and the processor (tokenizer, chat template, image and video processor settings). What a
--check-media full run found serves any later run; what the header check found, only header checks.
The media files themselves are not looked at again: an image replaced in place by one of another
size, under an unchanged data file, keeps its old entry until the data file is touched.
"""

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from qwen_ft.data.samples import Samples, Source
from qwen_ft.video import VideoPlan

FOLDER = ".qwen-ft-data-index"
VERSION = 3  # of what an index file holds; a change makes every older file a miss (3: boxes written in the counts)


def index_folder(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve().parent / FOLDER


def processor_fingerprint(collator) -> str:
    """A digest of everything in the processor that decides a sample's tokens."""
    processor = collator.processor
    parts = [
        processor.tokenizer.backend_tokenizer.to_str(),
        processor.chat_template or "",
        json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str),
        json.dumps(processor.video_processor.to_dict(), sort_keys=True, default=str),
        json.dumps(collator.template_options, sort_keys=True),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def files_of(source: Source) -> list:
    """(path, size, modification time) of the source's file, or of every file of a dataset folder."""
    path = Path(source.path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def key_of(source: Source, settings: dict) -> str:
    return json.dumps({"version": VERSION, "files": files_of(source), **settings}, sort_keys=True, default=str)


def file_of(folder: Path, source: Source) -> Path:
    return folder / (hashlib.sha256(str(Path(source.path).resolve()).encode()).hexdigest()[:20] + ".npz")


def rows_of(samples: Samples, number: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of a source's samples, and the rows of their images, in the order they were read."""
    positions = np.flatnonzero(samples.table["source"] == number)
    return positions, samples.select(positions, base=True).image_rows()[0]


def load_index(folder: Path, samples: Samples, settings: dict, full: bool) -> list[int]:
    """Fill in what the index holds for each source whose key matches; returns the numbers of the sources
    it holds nothing valid for. With full (--check-media full), only what a full check found is valid."""
    missing = []
    for number, source in enumerate(samples.sources):
        positions, rows = rows_of(samples, number)
        try:
            with np.load(file_of(folder, source)) as found:
                valid = found["key"].tobytes().decode() == key_of(source, settings) and (found["full"] or not full)
                valid = valid and len(found["measure"]) == len(positions) and len(found["image_sizes"]) == len(rows)
                if valid:
                    samples.table["image_sizes"][rows] = found["image_sizes"]
                    samples.table["measure"][positions] = found["measure"]
                    plans = json.loads(found["video_plans"].tobytes())
        except (OSError, KeyError, ValueError):  # no index yet, or one written by a run that was cut off
            valid = False
        if not valid:
            missing.append(number)
            continue
        for position, sample_plans in zip(positions.tolist(), plans):
            if sample_plans:
                samples.video_plans[position] = [VideoPlan(*plan[:3], tuple(plan[3]), plan[4]) for plan in sample_plans]
    return missing


def save_index(folder: Path, samples: Samples, settings: dict, sources: list[int], full: bool) -> None:
    """Write the index file of each of these sources (under a temporary name, then renamed), saying whether a
    full check found it. The index only saves time: a folder that can't be written is a warning."""
    try:
        write_index(folder, samples, settings, sources, full)
    except OSError as e:
        print(f"warning: the data index was not saved ({e}); the next start checks the data again", file=sys.stderr)


def write_index(folder: Path, samples: Samples, settings: dict, sources: list[int], full: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number in sources:
        source = samples.sources[number]
        positions, rows = rows_of(samples, number)
        plans = [[list(plan) for plan in samples.video_plans.get(p, [])] for p in positions.tolist()]
        target = file_of(folder, source)
        partial = target.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            partial,
            key=np.frombuffer(key_of(source, settings).encode(), dtype=np.uint8),
            full=np.array(full),
            image_sizes=samples.table["image_sizes"][rows],
            measure=samples.table["measure"][positions],
            video_plans=np.frombuffer(json.dumps(plans).encode(), dtype=np.uint8),
        )
        partial.replace(target)


def index_settings(cfg, collator) -> dict:
    """The settings an index file's contents depend on, besides the source itself."""
    return {
        "media_root": str(Path(cfg.media_root).resolve()),
        "data_format": cfg.data_format,
        "columns": cfg.columns,
        "video": dataclasses.asdict(cfg.video()),
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "processor": processor_fingerprint(collator),
    }
