"""Boxes and points: written once in the data, in pixels of the original image, and rendered in each family's
own convention where the processor's resize is known (the collator), so that the numbers are those the model sees.

Content parts of the messages form (as normalise_part checks them):

    {"type": "box", "box": [x1, y1, x2, y2], "label": "cat", "image": 0}
    {"type": "point", "point": [x, y], "label": "OK button", "image": 0, "box": [x1, y1, x2, y2]}
    {"type": "ref", "ref": "the cat"}

"image" is the index of the sample's image the box is in (needed when the sample has several), "relative": true
says the numbers are fractions of the image's width and height (ms-swift's bbox_type norm1), a point's "box" is
the bounds of what it points at, used only to score answers (eval_point_in_box), and a "ref" is a referring
expression, which Qwen2-VL wraps in its object tokens. ms-swift's "objects" with <ref-object> and <bbox>
placeholders become these parts as they are read (place_objects).

How each family writes them (families.py: box_form, box_scale), from Qwen's own documents:

    qwen2-vl     <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, in thousandths
                 of the image's width and height (arXiv 2409.12191, 2.2.1); a point as <|box_start|>(x,y)<|box_end|>
    qwen2.5-vl   {"bbox_2d": [x1, y1, x2, y2], "label": "cat"} (a point: "point_2d": [x, y]) in pixels of the image
                 as the processor resized it (cookbooks/spatial_understanding.ipynb)
    qwen3-vl,    the same JSON in thousandths again (Qwen3-VL's cookbooks/2d_grounding.ipynb)
    -moe, 3.5

A run of boxes and points that stands on lines of its own (or is the whole message) is an answer, written in the
family's list form: Qwen2.5-VL's and Qwen3-VL's cookbooks answer with a ```json fenced list, one object a line.
Inside a line of text a box is written inline: a JSON object when it has a label, its bare list of numbers when
not (as ms-swift writes a <bbox> for these families); Qwen2-VL's tokens read the same either way.
"""

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PARTS = ("box", "point", "ref")
LOCATED = ("box", "point")  # the parts with coordinates
KEYS = {
    "box": ("box", "label", "image", "relative"),
    "point": ("point", "label", "image", "relative", "box"),
    "ref": ("ref",),
}
# Qwen2-VL's grounding tokens. They are special tokens: decoding with skip_special_tokens drops them.
REF_START, REF_END, BOX_START, BOX_END = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"
# Where a sample's buffer (samples.py: one JSON object per sample, no spaces) holds a grounding part.
MARKER = re.compile(rb'"type":"(?:box|point|ref)"')

Resize = Callable[[int, int], tuple[int, int]]  # (height, width) of an image -> as the processor resizes it


# -- Reading and checking ---------------------------------------------------------------------------------------


def numbers(value, count: int, what: str) -> list:
    """value, if it is a list of count finite numbers; ValueError naming what it should be otherwise."""
    if not (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        form = "[x1, y1, x2, y2]" if count == 4 else "[x, y]"
        raise ValueError(f"{what} is {json.dumps(value)[:80]}, expected {form}: {count} numbers")
    return value


def checked_box(box, what: str) -> list:
    x1, y1, x2, y2 = numbers(box, 4, what)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"{what} {fmt(box)} has x2 <= x1 or y2 <= y1 (a box is [x1, y1, x2, y2]: top left, bottom right)"
        )
    return box


def normalise_part(part: dict, kind: str, special_tokens: tuple[str, ...] = ()) -> dict:
    """A box, point or ref part as {"type", ...its keys}; ValueError says what is wrong with it."""
    unknown = [key for key in part if key not in ("type", *KEYS[kind])]
    if unknown:
        raise ValueError(f"a {kind} part has the key {unknown[0]!r}, which is not read (only {', '.join(KEYS[kind])})")
    texts = {"ref": part.get("ref")} if kind == "ref" else {"label": part.get("label")}
    for key, text in texts.items():
        if (text is not None or kind == "ref") and not isinstance(text, str):
            raise ValueError(f"a {kind} part's '{key}' is not a string")
        for token in special_tokens:
            if text and token in text:
                raise ValueError(f"a {kind} part's '{key}' contains the special token {token}; remove it from the data")
    if kind == "ref":
        return {"type": "ref", "ref": part["ref"]}
    normal = {"type": kind}
    if kind == "box":
        normal["box"] = checked_box(part.get("box"), "a box part's 'box'")
    else:
        normal["point"] = numbers(part.get("point"), 2, "a point part's 'point'")
        if part.get("box") is not None:
            normal["box"] = checked_box(part["box"], "a point part's 'box'")
    if part.get("label") is not None:
        normal["label"] = part["label"]
    image = part.get("image")
    if image is not None:
        if not isinstance(image, int) or isinstance(image, bool) or image < 0:
            raise ValueError(
                f"a {kind} part's 'image' is {json.dumps(image)[:40]}, expected an image's index: 0, 1, ..."
            )
        normal["image"] = image
    if part.get("relative") not in (None, False, True):
        raise ValueError(f"a {kind} part's 'relative' is not true or false")
    if part.get("relative"):
        normal["relative"] = True
    return normal


def check_images(messages: list[dict]) -> None:
    """ValueError unless each box and point names an image the sample shows in or before its message, saying
    which when the sample has several."""
    total = sum(part["type"] == "image" for m in messages for part in m["content"])
    shown = 0
    for number, message in enumerate(messages):
        shown += sum(part["type"] == "image" for part in message["content"])
        for part in message["content"]:
            if part["type"] not in LOCATED:
                continue
            kind = part["type"]
            if not shown:
                raise ValueError(f"message {number}: a {kind} with no image in or before its message")
            if "image" not in part and total > 1:
                raise ValueError(
                    f'message {number}: a {kind} without "image" in a sample of {total} images: say which image '
                    'it is in ("image": 0 for the first)'
                )
            if part.get("image", 0) >= shown:
                raise ValueError(
                    f"message {number}: a {kind} in image {part['image']}, but the sample shows {shown} "
                    f"image{'s' * (shown != 1)} up to this message (images count from 0)"
                )


def pixels(values: list, part: dict, size: tuple[int, int]) -> list[float]:
    """A part's box or point in pixels of its original image of (height, width) size."""
    if not part.get("relative"):
        return [float(v) for v in values]
    height, width = size
    return [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]


def outside(values: list[float], size: tuple[int, int]) -> bool:
    height, width = size
    return any(not 0 <= v <= (width if i % 2 == 0 else height) for i, v in enumerate(values))


def with_grounding(samples) -> np.ndarray:
    """The positions (as read) of the view's samples that hold a box, point or ref, found in the samples' buffer
    without reading every sample."""
    table = samples.table
    offsets = [match.start() for match in MARKER.finditer(table["blob"].data)]
    positions = np.unique(np.searchsorted(table["ends"], offsets, side="right"))
    return positions[np.isin(positions, samples.order)]


def problems(samples) -> dict[int, str]:
    """Each sample (by position as read) with a box or point outside its image, and the first such: the image
    sizes must be known (media_check.check_media finds them)."""
    found = {}
    for position in with_grounding(samples).tolist():
        sample = samples.sample(position)
        located = [(n, part) for n, m in enumerate(sample.messages) for part in m["content"] if part["type"] in LOCATED]
        for number, part in located:
            image = part.get("image", 0)
            size = sample.image_sizes[image]
            shapes = [(part["type"], part[part["type"]])] + (
                [("its box", part["box"])] if part["type"] == "point" and "box" in part else []
            )
            bad = [(kind, values) for kind, values in shapes if outside(pixels(values, part, size), size)]
            if bad:
                kind, values = bad[0]
                relative = " (relative: fractions of it)" if part.get("relative") else ""
                found[position] = (
                    f"message {number}: {part['type']}{'' if kind == part['type'] else ' ' + kind} {fmt(values)}"
                    f"{relative} is outside image {image}, of {size[1]}x{size[0]} px"
                )
                break
    return found


# -- ms-swift's grounding format -----------------------------------------------------------------------------------

SWIFT_PLACEHOLDER = re.compile(r"(<ref-object>|<bbox>)")


def place_objects(messages: list[dict], objects) -> list[dict]:
    """ms-swift's "objects": {"ref": [...], "bbox": [[x1, y1, x2, y2] or [x, y], ...], "bbox_type": "real" or
    "norm1", "image_id": [...]} fill the text's <ref-object> and <bbox> placeholders in order, each list its
    own (ms-swift pairs neither with the other): a ref becomes a ref part, a bbox a box (or, of two numbers, a
    point) in image image_id (0 by default), relative for norm1."""
    if not isinstance(objects, dict):
        raise ValueError(f"'objects' is a {type(objects).__name__}, expected an object with 'ref' and 'bbox' lists")
    unknown = [key for key in objects if key not in ("ref", "bbox", "bbox_type", "image_id")]
    if unknown:
        raise ValueError(
            f"'objects' has the key {unknown[0]!r}, which is not read (only ref, bbox, bbox_type, image_id)"
        )
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    bbox_type = objects.get("bbox_type") or "real"
    if not isinstance(refs, list) or not isinstance(boxes, list):
        raise ValueError("'objects' needs 'ref' and 'bbox' lists")
    if bbox_type not in ("real", "norm1"):
        raise ValueError(f"'objects' has bbox_type {bbox_type!r}; expected real (pixels) or norm1 (fractions)")
    image_ids = objects.get("image_id") or [0] * len(boxes)
    if not isinstance(image_ids, list) or len(image_ids) != len(boxes):
        raise ValueError(f"'objects' has {len(boxes)} bbox but an image_id list of another length")
    texts = [part["text"] for m in messages for part in m["content"] if part["type"] == "text"]
    for name, placeholder, values in (("ref", "<ref-object>", refs), ("bbox", "<bbox>", boxes)):
        count = sum(text.count(placeholder) for text in texts)
        if count != len(values):
            raise ValueError(f"{count} {placeholder} placeholder{'s' * (count != 1)} in the text but {len(values)} "
                             f"in the objects' '{name}'")  # fmt: skip
    refs, boxes = iter(refs), iter(zip(boxes, image_ids))
    placed = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] != "text":
                content.append(part)
                continue
            for piece in SWIFT_PLACEHOLDER.split(part["text"]):
                if piece == "<ref-object>":
                    content.append({"type": "ref", "ref": next(refs)})
                elif piece == "<bbox>":
                    box, image = next(boxes)
                    kind = "point" if isinstance(box, list) and len(box) == 2 else "box"
                    relative = {"relative": True} if bbox_type == "norm1" else {}
                    content.append({"type": kind, kind: box, "image": image, **relative})
                elif piece:
                    content.append({"type": "text", "text": piece})
        placed.append({**message, "content": content})
    return placed


# -- Rendering -------------------------------------------------------------------------------------------------------


def has_grounding(messages: list[dict]) -> bool:
    return any(
        isinstance(m["content"], list) and any(isinstance(p, dict) and p.get("type") in PARTS for p in m["content"])
        for m in messages
    )


def scaled(values: list, part: dict, size: tuple[int, int], family, resize: Resize) -> list[int]:
    """A box or point in the numbers the family writes, rounded and kept within the image, by the rules of Qwen's
    process_bbox.ipynb: round(x / width * 1000) within 0..1000, or round(x * (resized_width / width)) within
    0..resized_width - 1 (and the same for y with the heights)."""
    height, width = size
    values = pixels(values, part, size)
    if family.box_scale == "1000":
        return [min(max(round(v / (width if i % 2 == 0 else height) * 1000), 0), 1000) for i, v in enumerate(values)]
    new_height, new_width = resize(height, width)
    sides = ((width, new_width), (height, new_height))
    return [
        min(max(round(v * (sides[i % 2][1] / sides[i % 2][0])), 0), sides[i % 2][1] - 1) for i, v in enumerate(values)
    ]


def tokens_form(kind: str, numbers: list[int], label: str | None) -> str:
    ref = f"{REF_START}{label}{REF_END}" if label is not None else ""
    corners = ",".join(f"({x},{y})" for x, y in zip(numbers[::2], numbers[1::2]))
    return f"{ref}{BOX_START}{corners}{BOX_END}"


def json_object(kind: str, numbers: list[int], label: str | None) -> str:
    key = "bbox_2d" if kind == "box" else "point_2d"
    return json.dumps({key: numbers} | ({"label": label} if label is not None else {}), ensure_ascii=False)


def render(messages: list[dict], image_sizes: list[tuple[int, int]], family, resize: Resize) -> list[dict]:
    """The messages with their boxes, points and refs written as text in the family's convention; image_sizes are
    the (height, width) of the sample's images in order, as loaded. Messages without any are returned as they are."""
    if not has_grounding(messages):
        return messages
    return [{**m, "content": render_content(m["content"], image_sizes, family, resize)} for m in messages]


def render_content(parts: list, image_sizes, family, resize: Resize) -> list[dict]:
    def blank(part) -> bool:
        return part["type"] == "text" and not part["text"].strip()

    def written(part) -> tuple[str, list[int], str | None]:
        kind = part["type"]
        return kind, scaled(part[kind], part, image_sizes[part.get("image", 0)], family, resize), part.get("label")

    out, i = [], 0
    while i < len(parts):
        part = parts[i]
        if part["type"] == "ref":
            text = f"{REF_START}{part['ref']}{REF_END}" if family.box_form == "tokens" else part["ref"]
            out.append({"type": "text", "text": text})
        elif part["type"] not in LOCATED:
            out.append(part)
        if part["type"] not in LOCATED:
            i += 1
            continue
        # The run: this box or point and those after it with only blank text between.
        end = i + 1
        for j in range(i + 1, len(parts)):
            if parts[j]["type"] in LOCATED:
                end = j + 1
            elif not blank(parts[j]):
                break
        # On lines of its own: nothing but media or the message's edge, or a line break, on either side.
        before = out[-1]["text"].rstrip(" \t") if out and out[-1]["type"] == "text" else ""
        after = parts[end]["text"].lstrip(" \t") if end < len(parts) and parts[end]["type"] == "text" else ""
        own_lines = before in ("", before.rstrip("\n") + "\n") and after in ("", "\n" + after.lstrip("\n"))
        if family.box_form == "json" and own_lines:
            objects = [json_object(*written(p)) for p in parts[i:end] if p["type"] in LOCATED]
            out.append({"type": "text", "text": "```json\n[\n\t" + ",\n\t".join(objects) + "\n]\n```"})
        else:
            for p in parts[i:end]:
                if p["type"] not in LOCATED:
                    out.append(p)
                elif family.box_form == "tokens":
                    out.append({"type": "text", "text": tokens_form(*written(p))})
                else:
                    kind, values, label = written(p)
                    text = json_object(kind, values, label) if label is not None else json.dumps(values)
                    out.append({"type": "text", "text": text})
        i = end
    return out


def as_decoded(text: str) -> str:
    """The text as a generated answer reads once decoded without special tokens (Qwen2-VL's grounding tokens are)."""
    for token in (REF_START, REF_END, BOX_START, BOX_END):
        text = text.replace(token, "")
    return text


# -- Parsing answers back ------------------------------------------------------------------------------------------

NUMBER = r"-?\d+(?:\.\d+)?"
# Qwen2-VL: "(x1,y1),(x2,y2)" or "(x,y)", with or without the tokens around it (decoding may have dropped them).
TUPLES = re.compile(
    rf"(?:{re.escape(REF_START)}(.*?){re.escape(REF_END)})?(?:{re.escape(BOX_START)})?\s*"
    rf"\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)(?:\s*,\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\))?",
    re.DOTALL,
)
JSON_OBJECT = re.compile(r"\{[^{}]*\}")
JSON_KEYS = re.compile(rf'"(bbox_2d|point_2d)"\s*:\s*\[\s*({NUMBER}(?:\s*,\s*{NUMBER})*)\s*\]')
LABEL = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')
BARE_LIST = re.compile(rf"\[\s*({NUMBER}(?:\s*,\s*{NUMBER}){{1,3}})\s*\]")


@dataclass(frozen=True)
class Found:
    """A box or point read from an answer, in the numbers the family writes."""

    kind: str
    values: tuple[float, ...]
    label: str | None = None


def parse(text: str, family) -> list[Found]:
    """The boxes and points of an answer written in the family's convention, in order. Lenient as a reader of
    generated text must be: a truncated list, a missing fence or missing tokens still give what is there."""
    found = []
    if family.box_form == "tokens":
        for match in TUPLES.finditer(text):
            label, *values = match.groups()
            values = tuple(float(v) for v in values if v is not None)
            found.append(Found("box" if len(values) == 4 else "point", values, label))
        return found
    for match in JSON_OBJECT.finditer(text):
        keys = JSON_KEYS.search(match.group())
        if keys:
            values = tuple(float(v) for v in keys.group(2).split(","))
            kind = "box" if keys.group(1) == "bbox_2d" else "point"
            if len(values) == (4 if kind == "box" else 2):
                label = LABEL.search(match.group())
                found.append(Found(kind, values, json.loads(f'"{label.group(1)}"') if label else None))
    if not found:  # inline boxes without a label: bare lists of 4 (or 2) numbers
        for match in BARE_LIST.finditer(text):
            values = tuple(float(v) for v in match.group(1).split(","))
            if len(values) in (2, 4):
                found.append(Found("box" if len(values) == 4 else "point", values))
    return found


def original(values, size: tuple[int, int], family, resize: Resize) -> list[float]:
    """Numbers the family writes as pixels of the original image of (height, width) size."""
    height, width = size
    if family.box_scale == "1000":
        sides = (width / 1000, height / 1000)
    else:
        new_height, new_width = resize(height, width)
        sides = (width / new_width, height / new_height)
    return [v * sides[i % 2] for i, v in enumerate(values)]


# -- Scoring -----------------------------------------------------------------------------------------------------


def iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2] (corners in either order)."""
    ax1, ax2, bx1, bx2 = *sorted(a[0::2]), *sorted(b[0::2])
    ay1, ay2, by1, by2 = *sorted(a[1::2]), *sorted(b[1::2])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def matched(ious: list[list[float]], threshold: float = 0.5) -> int:
    """How many references (rows) get a prediction (column) of their own at IoU >= threshold, taking the best
    pairs first: one predicted box can't match two references."""
    pairs = sorted(((v, r, p) for r, row in enumerate(ious) for p, v in enumerate(row) if v >= threshold), reverse=True)
    rows, columns = set(), set()
    for _, r, p in pairs:
        if r not in rows and p not in columns:
            rows.add(r)
            columns.add(p)
    return len(rows)


@dataclass(frozen=True)
class Target:
    """A box or point an answer should give, in pixels of the original image."""

    kind: str
    values: tuple[float, ...]
    image: int
    bounds: tuple[float, ...] | None = None  # a point's box: what it points at


@dataclass(frozen=True)
class Reference:
    """What an answer is scored against: the targets, and how to read the answer's numbers back as pixels."""

    targets: tuple[Target, ...]
    image_sizes: tuple[tuple[int, int], ...]
    family: object
    resize: Resize


def reference(answer: dict | None, image_sizes, family, resize: Resize) -> Reference | None:
    """The Reference of an answer message (None when it has no box or point)."""
    targets = []
    for part in answer["content"] if answer and isinstance(answer["content"], list) else []:
        if part["type"] in LOCATED:
            image = part.get("image", 0)
            size = image_sizes[image]
            bounds = tuple(pixels(part["box"], part, size)) if part["type"] == "point" and "box" in part else None
            targets.append(Target(part["type"], tuple(pixels(part[part["type"]], part, size)), image, bounds))
    return Reference(tuple(targets), tuple(map(tuple, image_sizes)), family, resize) if targets else None


def scores(completion: str, ref: Reference) -> dict[str, float]:
    """How well an answer's boxes and points match the reference's, read back as pixels of the image each target is
    in: "iou", the mean over target boxes of the best IoU of a predicted box; "iou50", the share of target boxes
    with a predicted box of their own at IoU >= 0.5; for target points, the predicted point (or box centre)
    nearest each: "point_in_box", the share inside the target's box where it has one, and "point_distance" in
    pixels where it has none (the image's diagonal when nothing was predicted). Usable as a reward."""
    found = parse(completion, ref.family)
    result = {}

    def read(f: Found, image: int) -> list[float]:
        return original(f.values, ref.image_sizes[image], ref.family, ref.resize)

    boxes = [t for t in ref.targets if t.kind == "box"]
    if boxes:
        ious = [[iou(t.values, read(f, t.image)) for f in found if f.kind == "box"] for t in boxes]
        result["iou"] = sum(max(row, default=0.0) for row in ious) / len(boxes)
        result["iou50"] = matched(ious) / len(boxes)
    in_box, distances = [], []
    for target in (t for t in ref.targets if t.kind == "point"):
        height, width = ref.image_sizes[target.image]
        guesses = [centre(read(f, target.image)) for f in found]
        x, y = target.values
        nearest = min(guesses, key=lambda g: math.dist(g, (x, y)), default=None)
        if target.bounds:
            x1, y1, x2, y2 = target.bounds
            in_box.append(float(nearest is not None and x1 <= nearest[0] <= x2 and y1 <= nearest[1] <= y2))
        else:
            distances.append(math.dist(nearest, (x, y)) if nearest else math.hypot(width, height))
    if in_box:
        result["point_in_box"] = sum(in_box) / len(in_box)
    if distances:
        result["point_distance"] = sum(distances) / len(distances)
    return result


def centre(values: list[float]) -> tuple[float, float]:
    return (values[0], values[1]) if len(values) == 2 else ((values[0] + values[2]) / 2, (values[1] + values[3]) / 2)


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
