"""Reading and checking a messages-format dataset before any training step.

A data file is a JSON list, or a JSONL file, of samples like
    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image", "image": PATH_OR_URL},
                                        {"type": "video", "video": FILE_OR_FOLDER, "fps": 2.0, ...},
                                        {"type": "text", "text": "..."}, ...]}, ...]}
Every sample is checked up front: a problem becomes a DataError whose message names the
file, the sample index (and line, for JSONL) and what is wrong.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from qwen_ft.media import MediaError, is_url, load_image, resolve, shorten
from qwen_ft.video import VideoPlan, VideoSettings, plan_video

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video")
# Keys a media part may use for its reference: Qwen's own ("image") and transformers' ("url", "path").
MEDIA_KEYS = ("url", "path")
# Keys read from a sample and from a message. Any other key is an error rather than ignored: an
# "images" list or a "loss" flag that is silently dropped trains something other than what was meant.
# A sample's "id" only names it.
SAMPLE_KEYS = ("messages", "id")
MESSAGE_KEYS = ("role", "content")
# Other formats' stand-ins for media in text; this reader has nothing to put in their place.
PLACEHOLDERS = ("<image>", "<video>")
MAX_ERRORS_SHOWN = 10


class DataError(Exception):
    """Bad input data; str() is a one-line message for the user."""


class BadSample(DataError):
    """A sample whose media passed the checks but failed to load during training."""


@dataclass
class Sample:
    """One conversation with its content normalised to lists of parts and media references resolved."""

    source: str
    index: int
    line: int | None
    messages: list[dict]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width), filled by check_media
    video_plans: list[VideoPlan] = field(default_factory=list)  # frames, size and times as input
    length: int = 0  # tokens as model input, filled by Collator.drop_overlong

    @property
    def where(self) -> str:
        return f"{self.source}: sample {self.index}" + (f" (line {self.line})" if self.line else "")

    def parts(self, kind: str) -> list[dict]:
        return [part for message in self.messages for part in message["content"] if part["type"] == kind]

    def media(self, kind: str = "image") -> list:
        """The resolved references of the sample's images (or videos), in order."""
        return [part[kind] for part in self.parts(kind)]


def is_jsonl(path: Path, text: str) -> bool:
    """A .jsonl file, or a .json one holding one object per line (a common mix-up)."""
    if path.suffix == ".jsonl":
        return True
    first_line = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first_line), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: Path) -> list[tuple[int | None, object]]:
    """(line number or None, parsed record) for each sample of a JSON list or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file: {e}") from None
    if is_jsonl(path, text):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: sample {len(records)} (line {number}): malformed JSON: {e.msg} at column {e.colno}"
                ) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples (or a .jsonl file), got a {type(data).__name__}")
    return [(None, record) for record in data]


def normalise_part(part, media_dirs: tuple[Path, Path], special_tokens: tuple[str, ...]) -> dict:
    """A content part as {"type": "text", "text": ...} or {"type": "image", "image": resolved path or URL}."""
    if isinstance(part, str):
        part = {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ValueError(f"a content part is a {type(part).__name__}, expected an object")
    kind = part.get("type") or next((k for k in ("text", *MEDIA_TYPES) if k in part), None)
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError("a text part has no string 'text'")
        for token in special_tokens:
            if token in text:
                raise ValueError(f"text contains the special token {token}; remove it from the data")
        for placeholder in PLACEHOLDERS:
            if placeholder in text:
                kind = placeholder.strip("<>")
                raise ValueError(
                    f"text contains the placeholder {placeholder}, which would train as plain text: put the "
                    f'{kind} where it stands as a part {{"type": "{kind}", "{kind}": PATH}}'
                )
        return {"type": "text", "text": text}
    if kind in MEDIA_TYPES:
        ref = next((part[k] for k in (kind, *MEDIA_KEYS) if part.get(k) is not None), None)
        if kind == "image" and not isinstance(ref, str):
            raise ValueError("an image part has no 'image' path or URL")
        if kind == "video" and not (isinstance(ref, str) or (isinstance(ref, list) and ref)):
            raise ValueError("a video part has no 'video' file, folder or list of frame images")
        if kind == "video" and any(is_url(r) for r in (ref if isinstance(ref, list) else [ref])):
            raise ValueError(f"video '{shorten(str(ref))}' is a URL; videos must be local files or frame images")
        try:
            resolved = [resolve(r, *media_dirs) for r in ref] if isinstance(ref, list) else resolve(ref, *media_dirs)
        except MediaError as e:
            raise ValueError(f"{kind} {e}") from None
        return {**part, "type": kind, kind: resolved}
    raise ValueError(f"unknown content type {part.get('type')!r} (expected text or {' or '.join(MEDIA_TYPES)})")


def check_sample(
    record, media_dirs: tuple[Path, Path], special_tokens: tuple[str, ...], require_answer: bool = True
) -> list[dict]:
    """The sample's messages, normalised; ValueError saying what is wrong otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError('expected an object with a "messages" list')
    unread_keys(record, SAMPLE_KEYS, "the sample")
    messages = []
    for number, message in enumerate(record["messages"]):
        if not isinstance(message, dict):
            raise ValueError(f"message {number} is not an object")
        unread_keys(message, MESSAGE_KEYS, f"message {number}")
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
            parts = [normalise_part(part, media_dirs, special_tokens) for part in content]
        except ValueError as e:
            raise ValueError(f"message {number}: {e}") from None
        if role != "user" and any(part["type"] != "text" for part in parts):
            raise ValueError(f"message {number} ({role}) has media; images and videos belong in user messages")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message, so nothing to train on")
    return messages


def unread_keys(record: dict, known: tuple[str, ...], what: str) -> None:
    """ValueError naming the first key of record that this reader would ignore."""
    unknown = [key for key in record if key not in known]
    if unknown:
        raise ValueError(
            f"{what} has the key {unknown[0]!r}, which is not read (only {', '.join(known)}): images and videos "
            'go inside the messages as parts like {"type": "image", "image": PATH}; remove other keys'
        )


def read_samples(
    path: str | Path, media_root: str | Path = ".", special_tokens: tuple[str, ...] = (), require_answer: bool = True
) -> list[Sample]:
    """Parse and check every sample's structure, resolving media paths; DataError lists the problems."""
    path = Path(path)
    media_dirs = (path.parent, Path(media_root))
    samples, errors = [], []
    for index, (line, record) in enumerate(read_records(path)):
        sample = Sample(source=str(path), index=index, line=line, messages=[])
        try:
            sample.messages = check_sample(record, media_dirs, special_tokens, require_answer)
        except ValueError as e:
            errors.append(f"{sample.where}: {e}")
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no samples")
    raise_if_any(errors)
    return samples


def check_media(
    samples: list[Sample], video: VideoSettings | None = None, factor: int = 28, threads: int = 8, dist=None
):
    """Decode every image once and read every video's metadata and packets, recording the sizes they
    will have as model input; DataError names each one that can't be read as asked.

    video holds the defaults for a sample's video parts; factor is the model's patch size times its
    spatial merge size (the multiple frame sides are resized to). In a distributed run (dist) each
    process checks every world_size-th sample, and all of them learn every size and every problem.
    """
    video = video or VideoSettings()
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)

    def measure(sample: Sample) -> tuple[list, list, str | None]:
        """(image sizes, video shapes, problem) of one sample."""
        try:
            image_sizes = [load_image(ref).size[::-1] for ref in sample.media("image")]
        except MediaError as e:
            return [], [], f"{sample.where}: image {e}"
        try:
            video_plans = [plan_video(p["video"], video.for_part(p), factor) for p in sample.parts("video")]
        except MediaError as e:
            return [], [], f"{sample.where}: video {e}"
        except (TypeError, ValueError) as e:  # a per-sample setting of the wrong type or range
            return [], [], f"{sample.where}: video settings: {e}"
        return image_sizes, video_plans, None

    with ThreadPoolExecutor(threads) as pool:
        mine = list(pool.map(measure, samples[rank::world_size]))
    shares = dist.all_gather_objects(mine) if dist else [mine]
    errors = []
    for i, sample in enumerate(samples):
        sample.image_sizes, sample.video_plans, error = shares[i % world_size][i // world_size]
        if error:
            errors.append(error)
    raise_if_any(errors)


def raise_if_any(errors: list[str]) -> None:
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError("\n".join(shown) + more)
