"""A run's samples, held compactly, and one sample as the collator takes it.

A million samples as Python dicts take many GB, and each DataLoader worker would copy them page by
page as it touches their reference counts. Here the samples' messages are one buffer of JSON, and
what the checks find (image sizes, video plans, lengths) sits in numpy arrays: workers read them
without writing to them, so the pages stay shared.
"""

import json
from array import array
from dataclasses import dataclass, field

import numpy as np

from qwen_ft.video import VideoPlan


def where(source: str, index: int, line: int | None) -> str:
    """How messages name a sample: its file, its index in it, and its line in a JSONL file."""
    return f"{source}: sample {index}" + (f" (line {line})" if line else "")


@dataclass
class Source:
    """A data file (or dataset folder) and what reading it found."""

    path: str
    weight: float = 1.0  # samples drawn per sample of the file (mix)
    data_format: str = ""  # as detected, or as --data-format named it
    unread_keys: tuple[str, ...] = ()  # keys (columns) of its samples that no format reads: metadata


@dataclass
class Sample:
    """One conversation: its messages (content as lists of parts, media references resolved) and the
    sizes its media will have as model input."""

    source: str
    index: int
    line: int | None
    messages: list[dict]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width), found by check_media
    video_plans: list[VideoPlan] = field(default_factory=list)  # frames, size and times as input
    length: int = 0  # tokens as model input, found by lengths.measure and lengths.fit

    @property
    def where(self) -> str:
        return where(self.source, self.index, self.line)

    def parts(self, kind: str) -> list[dict]:
        return [part for message in self.messages for part in message["content"] if part["type"] == kind]

    def media(self, kind: str = "image") -> list:
        """The resolved references of the sample's images (or videos), in order."""
        return [part[kind] for part in self.parts(kind)]


class SampleBuilder:
    """Collects samples as they are read, then freezes them into Samples."""

    def __init__(self):
        self.sources: list[Source] = []
        self.source, self.index, self.line = array("i"), array("q"), array("q")
        self.blob, self.ends = bytearray(), array("q")
        self.image_refs, self.image_ids = {}, array("q")  # each distinct image reference once
        self.image_ends = array("q")
        self.with_video: list[int] = []

    def add(self, index: int, line: int | None, messages: list[dict]) -> None:
        """A sample of the last source added to self.sources."""
        self.source.append(len(self.sources) - 1)
        self.index.append(index)
        self.line.append(line or 0)
        self.blob += json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
        self.ends.append(len(self.blob))
        for message in messages:
            for part in message["content"]:
                if part["type"] == "image":
                    self.image_ids.append(self.image_refs.setdefault(part["image"], len(self.image_refs)))
                elif part["type"] == "video" and self.with_video[-1:] != [len(self.ends) - 1]:
                    self.with_video.append(len(self.ends) - 1)
        self.image_ends.append(len(self.image_ids))

    def __len__(self) -> int:
        return len(self.ends)

    def build(self) -> "Samples":
        def numbers(values, dtype):
            return np.frombuffer(values, dtype=dtype).copy() if len(values) else np.zeros(0, dtype)

        n = len(self.ends)
        table = {
            "source": numbers(self.source, np.int32),
            "index": numbers(self.index, np.int64),
            "line": numbers(self.line, np.int64),
            "blob": np.frombuffer(self.blob, dtype=np.uint8),  # shares the bytearray's memory: no second copy
            "ends": numbers(self.ends, np.int64),
            "image_ids": numbers(self.image_ids, np.int64),
            "image_ends": numbers(self.image_ends, np.int64),
            "image_sizes": np.zeros((len(self.image_ids), 2), np.int32),
            "measure": np.zeros((n, 3), np.int32),  # tokens, end of the last image or video, first trained token
            "length": np.zeros(n, np.int32),  # tokens as model input, at most --max-length
        }
        return Samples(self.sources, table, list(self.image_refs), self.with_video, {}, np.arange(n))


class Samples:
    """The samples of a run, in order: samples[i] is a Sample, samples[a:b] and select() are views that
    share the arrays (so what check_media and lengths.fit record through one is seen by all)."""

    def __init__(self, sources, table, image_refs, with_video, video_plans, order):
        self.sources: list[Source] = sources
        self.table: dict[str, np.ndarray] = table  # per sample (as read), or per image for image_*
        self.image_refs: list[str] = image_refs  # distinct image references; table["image_ids"] points here
        self.with_video: list[int] = with_video  # samples (as read) that hold a video
        self.video_plans: dict[int, list[VideoPlan]] = video_plans  # of those samples, found by check_media
        self.order = order  # the samples (as read) this view holds, in its order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(self.order[i], base=True)
        return self.sample(int(self.order[i]))

    def __iter__(self):
        return (self.sample(int(position)) for position in self.order)

    def select(self, indices, base: bool = False) -> "Samples":
        """A view of these samples (by index in this view; base=True: by position as read)."""
        order = np.asarray(indices, dtype=np.int64)
        order = order if base else self.order[order]
        return Samples(self.sources, self.table, self.image_refs, self.with_video, self.video_plans, order)

    def of_sources(self, numbers) -> "Samples":
        """The view's samples that come from these sources (numbers into self.sources)."""
        return self.select(np.flatnonzero(np.isin(self.table["source"][self.order], list(numbers))))

    def sample(self, position: int) -> Sample:
        table = self.table
        start = table["ends"][position - 1] if position else 0
        image_start = table["image_ends"][position - 1] if position else 0
        return Sample(
            source=self.sources[table["source"][position]].path,
            index=int(table["index"][position]),
            line=int(table["line"][position]) or None,
            messages=json.loads(table["blob"][start : table["ends"][position]].tobytes()),
            image_sizes=[
                tuple(size) for size in table["image_sizes"][image_start : table["image_ends"][position]].tolist()
            ],
            video_plans=self.video_plans.get(position, []),
            length=int(table["length"][position]),
        )

    def where(self, position: int) -> str:
        """Sample.where of the sample at this position, without reading its messages."""
        table = self.table
        return where(self.sources[table["source"][position]].path, table["index"][position], table["line"][position])

    def image_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows of this view's images in the table's per-image arrays (image_ids, image_sizes), sample by
        sample, and the position of the sample each belongs to."""
        table = self.table
        starts = np.concatenate([[0], table["image_ends"][:-1]])[self.order]
        counts = table["image_ends"][self.order] - starts
        rows = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return rows, np.repeat(self.order, counts)

    @property
    def lengths(self) -> np.ndarray:
        return self.table["length"][self.order]
