"""Reading and checking the training data before any training step.

--data names one source or several, `a.json,b.parquet`, each optionally weighted, `a.json:2,b.jsonl:0.5`
(a's samples twice, half of b's: see mix). A source is a JSON list or JSONL file, or a Hugging Face
dataset on disk (hf_datasets.py), in any format of formats.py; every sample becomes the messages form
    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image", "image": PATH_OR_URL},
                                        {"type": "video", "video": FILE_OR_FOLDER, "fps": 2.0, ...},
                                        {"type": "text", "text": "..."}, ...]}, ...]}
and is checked: a problem becomes a DataError whose message names the file, the sample index (and
line, for JSONL) and what is wrong. The media are checked afterwards, by media_check.py.
"""

import json
import math
from pathlib import Path

import numpy as np

from qwen_ft import grounding
from qwen_ft.data import hf_datasets
from qwen_ft.data.formats import (
    AUDIO_PARTS,
    AUDIO_PLACEHOLDER,
    CONTENT_KEYS,
    FORMATS,
    NO_AUDIO,
    formats_of,
    to_messages,
)
from qwen_ft.data.media import MediaError, is_url, resolve, shorten
from qwen_ft.data.samples import SampleBuilder, Samples, Source, where

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video")
# Keys a media part may use for its reference: Qwen's own ("image") and transformers' ("url", "path").
MEDIA_KEYS = ("url", "path")
# Keys read from a message. Any other key is an error rather than ignored: a "loss" flag that is
# silently dropped trains something other than what was meant.
MESSAGE_KEYS = ("role", "content")
# Other formats' stand-ins for media in text: read as such in those formats, a mistake in this one.
PLACEHOLDERS = ("<image>", "<video>")
# The keys of a preference pair (finetune_dpo.py) besides its format's: --columns may name them too.
PAIR_KEYS = ("prompt", "chosen", "rejected")
MAX_ERRORS_SHOWN = 10
# A larger sample (a JSONL line; in other files, a sample's texts and media references) is refused before it is
# copied: it is a mistake or an attack, and the copies a sample goes through would take many times its size. It
# leaves room for a 64 MiB image inline as a data: URL (85 MiB of base64).
MAX_SAMPLE_CHARS = 128 * 2**20
# json reads nested arrays and objects by recursion, up to Python's recursion limit (about 1000 levels).
TOO_DEEP = "nested too deeply to read (a sample's values nest a few levels deep, this one hundreds)"


class DataError(Exception):
    """Bad input data; str() is a one-line message for the user."""


class BadSample(DataError):
    """A sample whose media passed the checks but failed to load during training."""


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """'a.json,b.parquet:0.5' as [("a.json", 1.0), ("b.parquet", 0.5)]."""
    sources = []
    for item in spec.split(","):
        path, _, weight = item.strip().rpartition(":")
        try:
            weight = float(weight) if path else None
        except ValueError:  # a colon that is part of the path
            weight = None
        if weight is None:
            path, weight = item.strip(), 1.0
        if not path or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{spec}: '{item}' is not a data file with an optional weight above 0 (FILE or FILE:2)")
        sources.append((path, weight))
    return sources


def parse_columns(spec: str) -> dict[str, str]:
    """--columns 'question=query,answer=label' as {"query": "question", "label": "answer"}: source column to key."""
    renames, keys = {}, CONTENT_KEYS | {"id", *PAIR_KEYS}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        key, _, column = item.partition("=")
        if key not in keys or not column:
            known = ", ".join(sorted(keys))
            raise DataError(f"--columns: '{item}' is not KEY=COLUMN with KEY one of {known}")
        renames[column] = key
    return renames


def too_large() -> str:
    return f"longer than {MAX_SAMPLE_CHARS / 2**20:g} MiB, which no sample needs: leave it out"


def is_jsonl(path: Path, first_line: str) -> bool:
    """A .jsonl file, or a .json one holding one object per line (a common mix-up)."""
    if path.suffix == ".jsonl":
        return True
    try:
        return isinstance(json.loads(first_line), dict)
    except (json.JSONDecodeError, RecursionError):  # not JSON (a part of a JSON list), or nested too deeply: the
        return False  # file is read as one JSON document, which says which


def read_records(path: Path):
    """(line number or None, parsed record) for each sample of a JSON list or JSONL file, or a dataset's row.
    A JSONL file is read a line at a time, so a large one is never in memory as a whole."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if hf_datasets.is_dataset(path):
        try:
            yield from ((None, record) for _, record in hf_datasets.records(path))
        except hf_datasets.DatasetError as e:
            raise DataError(str(e)) from None
        return
    try:
        with path.open(encoding="utf-8") as file:
            first_line = file.readline(MAX_SAMPLE_CHARS + 1)
            while first_line and not first_line.strip():
                first_line = file.readline(MAX_SAMPLE_CHARS + 1)
            if is_jsonl(path, first_line):
                file.seek(0)
                samples, number = 0, 0
                # A line at most MAX_SAMPLE_CHARS + 1 long at a time: a longer one is refused before it is read whole.
                while line := file.readline(MAX_SAMPLE_CHARS + 1):
                    number += 1
                    if len(line) > MAX_SAMPLE_CHARS:
                        raise DataError(f"{where(path, samples, number)}: {too_large()}")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{where(path, samples, number)}: malformed JSON: {e.msg} at column {e.colno}"
                        ) from None
                    except RecursionError:
                        raise DataError(f"{where(path, samples, number)}: {TOO_DEEP}") from None
                    samples += 1
                    yield number, record
                return
            file.seek(0)
            text = file.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    del text
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples (or a .jsonl file), got a {type(data).__name__}")
    for i in range(len(data)):
        record, data[i] = data[i], None  # each record freed once read
        yield None, record


def resolver(data_dir: Path, media_root: Path):
    """resolve() for one source, remembering each reference's answer: a file used by many samples is
    looked up once."""
    found = {}

    def resolve_once(ref: str) -> str:
        if ref not in found:
            found[ref] = resolve(ref, data_dir, media_root)
        return found[ref]

    return resolve_once


def normalise_part(part, resolve_ref, special_tokens: tuple[str, ...]) -> dict:
    """A content part as {"type": "text", "text": ...} or {"type": "image", "image": resolved path or URL}."""
    if isinstance(part, str):
        part = {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ValueError(f"a content part is a {type(part).__name__}, expected an object")
    kind = part.get("type") or next((k for k in ("text", *MEDIA_TYPES, *AUDIO_PARTS) if k in part), None)
    if kind in AUDIO_PARTS:
        raise ValueError(f"an audio part: {NO_AUDIO}")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError("a text part has no string 'text'")
        for token in special_tokens:
            if token in text:
                raise ValueError(f"text contains the special token {token}; remove it from the data")
        if AUDIO_PLACEHOLDER in text:
            raise ValueError(f"text contains the placeholder {AUDIO_PLACEHOLDER}, which stands for audio: {NO_AUDIO}")
        for placeholder in PLACEHOLDERS:
            if placeholder in text:
                kind = placeholder.strip("<>")
                raise ValueError(
                    f"text contains the placeholder {placeholder}, which would train as plain text: put the "
                    f'{kind} where it stands as a part {{"type": "{kind}", "{kind}": PATH}}, or give the '
                    f"sample an '{kind}s' list (LLaMA-Factory's format)"
                )
        return {"type": "text", "text": text}
    if kind in grounding.PARTS:  # a box, point or referring expression
        return grounding.normalise_part(part, kind, special_tokens)
    if kind in MEDIA_TYPES:
        ref = next((part[k] for k in (kind, *MEDIA_KEYS) if part.get(k) is not None), None)
        if kind == "image" and not isinstance(ref, str):
            raise ValueError("an image part has no 'image' path or URL")
        if kind == "video" and not (isinstance(ref, str) or (isinstance(ref, list) and ref)):
            raise ValueError("a video part has no 'video' file, folder or list of frame images")
        refs = ref if isinstance(ref, list) else [ref]
        if kind == "video" and any(is_url(r) or r.startswith(hf_datasets.PREFIX) for r in refs):
            raise ValueError(f"video '{shorten(str(ref))}' is not a local file; videos must be files or frame images")
        try:
            resolved = [resolve_ref(r) for r in ref] if isinstance(ref, list) else resolve_ref(ref)
        except MediaError as e:
            raise ValueError(f"{kind} {e}") from None
        return {**part, "type": kind, kind: resolved}
    known = ", ".join(("text", *MEDIA_TYPES, *grounding.PARTS))
    raise ValueError(f"unknown content type {part.get('type')!r} (expected one of {known})")


def check_sample(record: dict, resolve_ref, special_tokens: tuple[str, ...], require_answer: bool = True) -> list[dict]:
    """The messages of a sample in the messages form, normalised; ValueError saying what is wrong otherwise."""
    messages, size = [], 0  # size: characters of text and references so far
    for number, message in enumerate(record["messages"]):
        if not isinstance(message, dict):
            raise ValueError(f"message {number} is not an object")
        unknown = [key for key in message if key not in MESSAGE_KEYS]
        if unknown:
            raise ValueError(
                f"message {number} has the key {unknown[0]!r}, which is not read (only {', '.join(MESSAGE_KEYS)}): "
                'images and videos go inside the content as parts like {"type": "image", "image": PATH}'
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {number} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and number != 0:
            raise ValueError(f"message {number} is a system message; only the first message may be one")
        content = message.get("content")
        if isinstance(content, str):
            content = [content]
        if not isinstance(content, list):
            raise ValueError(f"message {number} has no 'content' string or list")
        try:
            parts = [normalise_part(part, resolve_ref, special_tokens) for part in content]
        except ValueError as e:
            raise ValueError(f"message {number}: {e}") from None
        size += sum(len(value) for part in parts for value in part.values() if isinstance(value, str))
        if size > MAX_SAMPLE_CHARS:
            raise ValueError(f"its texts and media references are {too_large()}")
        if role != "user" and any(part["type"] in MEDIA_TYPES for part in parts):
            raise ValueError(f"message {number} ({role}) has media; images and videos belong in user messages")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message, so nothing to train on")
    grounding.check_images(messages)
    return messages


def read_samples(
    spec: str | Path,
    media_root: str | Path = ".",
    special_tokens: tuple[str, ...] = (),
    require_answer: bool = True,
    data_format: str | None = None,
    columns: dict[str, str] | None = None,
    split=None,
) -> Samples:
    """Parse and check every sample's structure, resolving media paths; DataError lists the problems.

    spec names the sources (see parse_sources); data_format, one of FORMATS, overrides detection;
    columns renames a source's keys (parse_columns) before its format is detected. split, for records that
    hold several samples (a preference pair: pairs.split_pair), gives a record's samples by name, each then
    read and checked as a sample of its own and kept in that order; problems name the sample they are in."""
    builder, errors = SampleBuilder(), []
    for path, weight in parse_sources(str(spec)):
        path = Path(path)
        source = Source(str(path), weight)
        builder.sources.append(source)
        resolve_ref = resolver(path if path.is_dir() else path.parent, Path(media_root))
        agreed, unread, first = None, set(), len(builder)  # agreed: the formats all samples so far read the same in
        for index, (line, record) in enumerate(read_records(path)):
            checked = [[]]  # a sample in error keeps its place until the errors are raised
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"a sample is a {type(record).__name__}, expected an object")
                record = {columns.get(key, key): value for key, value in record.items()} if columns else record
                samples = split(record) if split else {"": record}
                fits = (data_format,) if data_format else formats_of(next(iter(samples.values())))
                agreed = agree(agreed, fits)
                unread |= {k for sample in samples.values() for k in sample if k not in CONTENT_KEYS and k != "id"}
                sides = []
                for name, sample in samples.items():
                    try:
                        sample = to_messages(sample, fits[0])
                        sides.append(check_sample(sample, resolve_ref, special_tokens, require_answer))
                    except ValueError as e:
                        raise ValueError(f"{name}: {e}" if name else str(e)) from None
                checked = sides
            except ValueError as e:
                errors.append(f"{where(path, index, line)}: {e}")
            except RecursionError:  # a value json could read, nested too deeply to be printed or copied
                errors.append(f"{where(path, index, line)}: {TOO_DEEP}")
            for messages in checked:
                builder.add(index, line, messages)
        if len(builder) == first:
            raise DataError(f"{path}: no samples")
        source.data_format = data_format or (agreed[0] if agreed else "")
        source.unread_keys = tuple(sorted(unread))
    raise_if_any(errors)
    return builder.build()


def agree(agreed: list[str] | None, fits: tuple[str, ...]) -> list[str]:
    """The formats that both the samples before (agreed; None for the first) and this one (fits) read the same
    in; ValueError if none, or if this sample fits no format."""
    if not fits:
        raise ValueError(
            f'no "messages", "conversations" or "question" to read, so no format fits (formats: {", ".join(FORMATS)}; '
            "--columns maps other names)"
        )
    both = list(fits) if agreed is None else [f for f in agreed if f in fits]
    if not both:
        raise ValueError(
            f"reads as {fits[0]}, the samples before it as {agreed[0]}: a file holds one format (--data-format "
            "reads it as one)"
        )
    return both


def mix(samples: Samples, seed: int) -> Samples:
    """The samples, each source's `weight` times: its whole number of copies, then the fraction's share of
    its samples, drawn by the seed (a weight of 0.5: a fixed half of them)."""
    if all(source.weight == 1 for source in samples.sources):
        return samples
    rng = np.random.default_rng(seed)
    source_of = samples.table["source"][samples.order]
    picked = []
    for number, source in enumerate(samples.sources):
        mine = np.flatnonzero(source_of == number)
        copies, share = divmod(source.weight, 1)
        picked += [mine] * int(copies)
        picked.append(np.sort(rng.choice(mine, round(share * len(mine)), replace=False)))
    return samples.select(np.concatenate(picked))


def describe(samples: Samples, unit: str = "samples") -> list[str]:
    """A line per source: its samples (or pairs: unit), its format and the keys no format reads (kept out of
    training)."""
    counts = np.bincount(samples.table["source"][samples.order], minlength=len(samples.sources))
    lines = []
    for source, count in zip(samples.sources, counts.tolist()):
        unread = f"; not read: {', '.join(source.unread_keys)}" if source.unread_keys else ""
        weight = f" (weight {source.weight:g})" if source.weight != 1 else ""
        lines.append(f"{source.path}: {count} {unit}{weight}, {source.data_format} format{unread}")
    return lines


def raise_if_any(errors: list[str]) -> None:
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError("\n".join(shown) + more)
