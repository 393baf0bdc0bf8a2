"""The data formats qwen-ft reads, each turned into its own messages form as a sample is read.

    messages  {"messages": [{"role": "user", "content": [{"type": "image", "image": PATH}, "text"]}, ...]}
    llava     {"image": PATH or [PATHS], "video": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
               {"from": "gpt", "value": "..."}]}: LLaVA's, and the official Qwen2.5-VL / Qwen3-VL fine-tuning code's
    sharegpt  {"conversations": [{"from", "value"}] or "messages": [{"role", "content": "<image>..."}],
               "images": [PATHS], "videos": [...], "system": "..."}: LLaMA-Factory's sharegpt and openai styles
    trl       {"images": [...], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", ...}]}]}:
               TRL's, whose image parts carry no reference
    qwen-vl   {"conversations": [{"from": "user", "value": "Picture 1: <img>PATH</img>\\n..."}, ...]}: Qwen-VL's
    qa        {"question": "...", "answer": "...", "image" or "images": ..., "system": "..."}: one question and its
               answer, as a table's columns often are (--columns maps other names onto these)

A file's format is found from its samples' keys (formats_of); each sample becomes {"messages": [...]},
with its media placed where the placeholders (<image>, <video>, <img>PATH</img>) or reference-less parts
stood, in order. The messages then go through the same checks whatever the format was.
"""

import re

from qwen_ft.grounding import place_objects

FORMATS = ("messages", "sharegpt", "llava", "trl", "qwen-vl", "qa")  # detection prefers the earlier of equals
MEDIA_KINDS = ("image", "video")
# The names a turn's speaker goes by, in each format's words.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")
QWEN_VL_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)

# The sample keys each format reads ("id" only names a sample, in every format).
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "messages", "system", "images", "videos", "objects"),  # objects: ms-swift's boxes
    "llava": ("conversations", "image", "video"),
    "trl": ("messages", "images", "videos"),
    "qwen-vl": ("conversations",),
    "qa": ("question", "answer", "system", "image", "images", "video", "videos"),
}
# Audio, as other tools' formats carry it: LLaMA-Factory's "audios" list and <audio> placeholders, audio parts
# in messages (transformers' "audio", OpenAI's "input_audio"). Read as metadata or text, a sample would train on
# answers about sounds the model never hears.
AUDIO_KEYS = ("audios", "audio")
AUDIO_PLACEHOLDER = "<audio>"
AUDIO_PARTS = ("audio", "input_audio")
NO_AUDIO = "Qwen vision-language models take no audio: leave audio samples out of the data"
# A key that some format reads as content: a sample holding one its own format doesn't read would lose it,
# so that is an error. Any other key (a source, a licence) is the sample's metadata and is not read.
CONTENT_KEYS = frozenset(key for keys in FORMAT_KEYS.values() for key in keys)


def formats_of(record: dict) -> tuple[str, ...]:
    """The formats a sample reads the same in, in FORMATS order: a text-only conversation fits several. A
    format fits only if it reads each of the sample's content keys; if none does, the likeliest is given, whose
    reading then says which key is wrong."""
    shapes = sample_shapes(record)
    keys = set(record) & CONTENT_KEYS
    fitting = tuple(f for f in shapes if keys <= set(FORMAT_KEYS[f]))
    return fitting or shapes[:1]


def sample_shapes(record: dict) -> tuple[str, ...]:
    """The formats whose shape the sample has, by the keys that hold its conversation and media."""
    has = set(record) & CONTENT_KEYS
    if has & {"question", "answer"}:
        return ("qa",)
    if "conversations" in has:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        if any(isinstance(t, dict) and QWEN_VL_IMAGE.search(str(t.get("value", ""))) for t in turns):
            return ("qwen-vl",)
        if has & {"image", "video"}:
            return ("llava",)
        return ("sharegpt",) if has & {"images", "videos"} else ("sharegpt", "llava", "qwen-vl")
    if "messages" in has:
        if not has & {"images", "videos"}:
            return ("messages", "sharegpt", "trl")
        messages = record["messages"] if isinstance(record["messages"], list) else []
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        parts = [p for content in contents if isinstance(content, list) for p in content if isinstance(p, dict)]
        if any(media_slot(p) for p in parts) or any(isinstance(content, list) for content in contents):
            return ("trl",)
        if any(isinstance(content, str) and PLACEHOLDER.search(content) for content in contents):
            return ("sharegpt",)
        return ("sharegpt", "trl")  # text alone, in strings: the two read it the same
    return ()


def to_messages(record: dict, data_format: str) -> dict:
    """The sample in the messages form: {"messages": [...]} (and its "id"); ValueError says what is wrong."""
    for key in AUDIO_KEYS:
        if record.get(key):  # an empty list, or a table's empty cell, holds no audio
            raise ValueError(f"the sample has audio ({key!r}): {NO_AUDIO}")
    for key in record:
        if key in CONTENT_KEYS and key not in FORMAT_KEYS[data_format]:
            raise ValueError(
                f"the sample has the key {key!r}, which the {data_format} format does not read (it reads "
                f"{', '.join(FORMAT_KEYS[data_format])}): remove it, or pass the --data-format it is written in"
            )
    sample = {"id": record["id"]} if "id" in record else {}
    if data_format == "messages":
        if not isinstance(record.get("messages"), list):
            raise ValueError('expected an object with a "messages" list')
        return {**sample, "messages": record["messages"]}
    media = {kind: media_list(record, kind, data_format) for kind in MEDIA_KINDS}
    if data_format == "trl":
        messages = fill_slots(record.get("messages"), media)
    elif data_format == "qa":
        messages = question_and_answer(record, media)
    else:
        key = "messages" if data_format == "sharegpt" and "messages" in record else "conversations"
        messages = conversation(record.get(key), key, media, data_format)
        if data_format == "sharegpt" and record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
        if data_format == "sharegpt" and record.get("objects") is not None:  # ms-swift's <ref-object> and <bbox>
            messages = place_objects(messages, record["objects"])
    return {**sample, "messages": messages}


def check_counts(places: dict[str, int], media: dict[str, list], what: str, data_format: str) -> None:
    """ValueError unless the sample's text (or parts) has a place for each of its images and videos."""
    for kind in MEDIA_KINDS:
        if places[kind] != len(media[kind]):
            listed = kind + "s" if data_format in ("sharegpt", "trl") else kind
            count = f"{len(media[kind])} {kind}" + "s" * (len(media[kind]) != 1)
            raise ValueError(
                f"{places[kind]} {what.format(kind=kind, s='s' * (places[kind] != 1))} but {count} in '{listed}'"
            )


def media_list(record: dict, kind: str, data_format: str) -> list:
    """The sample's images (or videos), in order: its `images` list, or its `image` value, one or a list."""
    plural = kind + "s"
    key = plural if data_format in ("sharegpt", "trl") or (data_format == "qa" and plural in record) else kind
    value = record.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"'{key}' is a {type(value).__name__}, expected a path or a list of them")
    return [entry for entry in value if entry is not None]  # a table's empty cells


def media_slot(part: dict) -> bool:
    """A TRL image or video part: it stands for the next entry of the sample's images (or videos) list."""
    return part.get("type") in MEDIA_KINDS and all(part.get(k) is None for k in (part["type"], "url", "path"))


def fill_slots(messages, media: dict[str, list]) -> list[dict]:
    """TRL's messages, each reference-less image or video part given the next entry of the media lists."""
    if not isinstance(messages, list):
        raise ValueError('expected an object with a "messages" list')
    contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
    parts = [p for content in contents if isinstance(content, list) for p in content if isinstance(p, dict)]
    places = {kind: sum(p.get("type") == kind for p in parts) for kind in MEDIA_KINDS}
    check_counts(places, media, "{kind} part{s} in the messages", "trl")
    filled = []
    for message, content in zip(messages, contents):
        if isinstance(content, list):
            message = {**message, "content": [with_reference(part, media) for part in content]}
        filled.append(message)
    return filled


def with_reference(part, media: dict[str, list]):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in MEDIA_KINDS:
        return part
    if not media_slot(part):
        raise ValueError(f"an {kind} part has its own reference and the sample a '{kind}s' list: give one of them")
    return {key: value for key, value in part.items() if key not in ("url", "path")} | {kind: media[kind].pop(0)}


def conversation(turns, key: str, media: dict[str, list], data_format: str) -> list[dict]:
    """The turns of a conversation as messages, each placeholder in the text replaced by the next medium."""
    if not isinstance(turns, list):
        raise ValueError(f'expected an object with a "{key}" list')
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"message {number} is not an object")
        speaker, text = ("role", "content") if "role" in turn else ("from", "value")
        unknown = [k for k in turn if k not in (speaker, text)]
        if unknown:
            raise ValueError(f"message {number} has the key {unknown[0]!r}, which is not read (only {speaker}, {text})")
        role = ROLE_NAMES.get(turn.get(speaker))
        if role is None:
            names = ", ".join(ROLE_NAMES)
            raise ValueError(f"message {number} has unknown '{speaker}' {turn.get(speaker)!r} (expected {names})")
        if not isinstance(turn.get(text), str):
            raise ValueError(f"message {number} has no '{text}' string")
        messages.append({"role": role, "content": turn[text]})
    if data_format == "qwen-vl":
        return [{**m, "content": split_qwen_vl(m["content"])} for m in messages]
    texts = [m["content"] for m in messages]
    places = {kind: sum(t.count(f"<{kind}>") for t in texts) for kind in MEDIA_KINDS}
    check_counts(places, media, "<{kind}> placeholder{s} in the text", data_format)
    return [{**m, "content": split_placeholders(m["content"], media)} for m in messages]


def split_placeholders(text: str, media: dict[str, list]) -> list:
    """Text with <image> and <video> placeholders as parts, each placeholder taking the next image or video."""
    parts = []
    for piece in PLACEHOLDER.split(text):
        if PLACEHOLDER.fullmatch(piece):
            kind = piece.strip("<>")
            parts.append({"type": kind, kind: media[kind].pop(0)})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def split_qwen_vl(text: str) -> list:
    """Qwen-VL's text, each <img>PATH</img> an image part; the text around it ("Picture 1: ") stays."""
    parts = []
    for i, piece in enumerate(QWEN_VL_IMAGE.split(text)):
        if i % 2:
            parts.append({"type": "image", "image": piece.strip()})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def question_and_answer(record: dict, media: dict[str, list]) -> list[dict]:
    """A question (after its images and videos) and its answer as one user and one assistant message."""
    question, answer = record.get("question"), record.get("answer")
    if isinstance(answer, list) and len(answer) == 1:  # a table's answers column often holds one-element lists
        answer = answer[0]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("a question-answer sample needs a 'question' string and an 'answer' string")
    user = [{"type": kind, kind: ref} for kind in MEDIA_KINDS for ref in media[kind]]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
    return [*system, {"role": "user", "content": [*user, question]}, {"role": "assistant", "content": answer}]
